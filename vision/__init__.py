"""Image datasets and timm region features (grid / patch / pooled) computed with Ray Data."""
