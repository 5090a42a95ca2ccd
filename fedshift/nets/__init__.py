"""The networks: the multi-branch model and its architectures (models), robustness modules placed in the trunk
(modules), the ViT (vit) and the Stack Overflow LSTM (lm)."""
