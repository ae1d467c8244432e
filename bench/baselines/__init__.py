"""Hand-written services Carrara is measured against (same model, features and Redis)."""
