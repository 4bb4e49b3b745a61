"""Array operations with PyTorch semantics, shared by the model, losses and inference."""
