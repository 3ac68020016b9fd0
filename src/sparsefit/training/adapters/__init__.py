"""Parameter-efficient fine-tuning of (sparse) models: row deltas (the module lives in
`models.row_deltas`, beside SLoRB, since loaders restore it) on the most important output rows,
chosen by `importance/` criteria in `select`; LoRA through peft (`lora`); a 4-bit frozen base
(`quantized`); `finetune` puts them into the fine-tuning loop."""
