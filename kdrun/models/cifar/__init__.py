"""The CIFAR-100 KD benchmark's models under RepDistiller's and mdistiller's module names."""
