"""Pretrained BERT and Llama backbones read from Hugging Face dirs, and LoRA."""
