"""Parameter-efficient fine-tuning of (sparse) models: row deltas on the most important output rows
(`rows`, chosen by `importance/` criteria in `select`), LoRA through peft (`lora`), and a 4-bit frozen
base (`quantized`); `finetune` puts them into the fine-tuning loop."""
