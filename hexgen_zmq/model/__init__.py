"""The model: checkpoints, the decoder layers a stage runs, its CPU kernels, and sampling."""
