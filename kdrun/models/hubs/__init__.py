"""Models of other libraries (timm, torchvision) and weights from files or their caches."""
