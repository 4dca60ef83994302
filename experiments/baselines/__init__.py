"""Outside methods the studies compare against (PEFT's AdaLoRA)."""
