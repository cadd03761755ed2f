"""One run: its pipeline (data -> the scheme's stages -> timing -> summary), the schemes
(who teaches whom), the stage protocol (train, reuse or resume through the stage cache),
provenance (what a stage key holds), summary rows, a user's teacher, config validation."""
