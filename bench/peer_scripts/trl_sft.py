"""The sft peer, written as a TRL user would: SFTTrainer + PEFT LoRA on prompt/completion conversations
(completion-only loss, the model's chat template), packing off or on. Prints one JSON line.

    python bench/peer_scripts/trl_sft.py <model dir> <rows json> <out dir> <threads> <packing 0|1> <max_length>
"""
import json
import sys
import time

start = time.perf_counter()
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

model_dir, rows_file, out_dir, threads, packing, max_length = sys.argv[1:7]
torch.set_num_threads(int(threads))
rows = json.loads(open(rows_file).read())


def conversations(split):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in rows[split]["prompt"]],
                              "completion": [[{"role": "assistant", "content": c}] for c in rows[split]["completion"]]})


tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
args = SFTConfig(output_dir=out_dir, per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=1e-3,
                 num_train_epochs=1, warmup_steps=0.06, lr_scheduler_type="linear", max_grad_norm=1.0, seed=0,
                 max_length=int(max_length), packing=packing == "1", save_strategy="no", report_to=[],
                 logging_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
trainer = SFTTrainer(model=model, args=args, train_dataset=conversations("train"), eval_dataset=conversations("validation"),
                     processing_class=tokenizer,
                     peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
out = trainer.train()
val = trainer.evaluate()
trainer.model.save_pretrained(f"{out_dir}/adapter", safe_serialization=True)
tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
print(json.dumps({"wall_s": time.perf_counter() - start, "train_s": out.metrics["train_runtime"],
                  "train_tokens_per_s": tokens / out.metrics["train_runtime"], "val_loss": val["eval_loss"]}))
