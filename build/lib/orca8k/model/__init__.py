"""The model side: the fine-tuning tokenizer (`tokenizer`) and its plain-text segment encoder (`segments`), the base
model (`base`: hub snapshot or the demo's, pre-trained by `pretrain`), linear RoPE scaling (`rope`) and safetensors
loading and saving (`loading`)."""
