"""The peer, written as an HF user would: Trainer + PEFT LoRA on the same data, split and hyperparameters as
the peftsweep trial it is compared with. Prints one JSON line (wall, train tokens/s, val/test accuracy).

    python bench/peer_scripts/hf_trainer_classification.py <model dir> <split json> <out dir> <threads> \
        [<group_by_length 0|1>]
"""
import json
import sys
import time

start = time.perf_counter()
import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,  # noqa: E402
                          Trainer, TrainingArguments)

model_dir, split_file, out_dir, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
group_by_length = len(sys.argv) > 5 and sys.argv[5] == "1"
torch.set_num_threads(threads)
splits = json.loads(open(split_file).read())
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.05,
                                         target_modules=["query", "value"]))


def encode(rows):
    ds = Dataset.from_dict({"text": rows["text"], "label": rows["label"]})
    return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True,
                  remove_columns=["text"])


train, val, test = (encode(splits[s]) for s in ("train", "validation", "test"))
args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=16, per_device_eval_batch_size=64,
                         learning_rate=1e-3, num_train_epochs=1, warmup_steps=0.06, lr_scheduler_type="linear",
                         weight_decay=0.0, max_grad_norm=1.0, seed=0, save_strategy="no", report_to=[],
                         logging_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
                         train_sampling_strategy="group_by_length" if group_by_length else "random")


def accuracy(pred):
    return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}


trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
                  compute_metrics=accuracy)
out = trainer.train()
val_scores, test_scores = trainer.evaluate(val), trainer.evaluate(test, metric_key_prefix="test")
model.save_pretrained(f"{out_dir}/adapter", safe_serialization=True)
tokens = sum(len(ids) for ids in train["input_ids"])
print(json.dumps({"wall_s": time.perf_counter() - start, "train_s": out.metrics["train_runtime"],
                  "train_tokens_per_s": tokens / out.metrics["train_runtime"],
                  "val_accuracy": val_scores["eval_accuracy"], "test_accuracy": test_scores["test_accuracy"]}))
