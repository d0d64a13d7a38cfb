"""Flow matching (training sigmas and loss, samplers) and the text-to-video pipeline."""
