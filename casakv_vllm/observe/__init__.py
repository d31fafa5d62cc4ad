"""What data-dependent policies see of a prompt: observations, stored per prompt."""
