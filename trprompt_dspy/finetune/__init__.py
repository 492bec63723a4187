"""LoRA SFT of the prompter on rollout records (peft + trl)."""
