"""Upscaling: fine-tunings turned into a larger model instead of one merged model (SMILE: a sparse
mixture of low-rank experts). A new upscaler (e.g. MoE building) is a new module here."""
