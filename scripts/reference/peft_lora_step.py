"""The PyTorch + PEFT side of `fedtune bench lora` (not run in CI: it needs PyTorch).

Usage: THREADS=2 python peft_lora_step.py MODEL.gguf
One training step as the benchmark defines it: batch 1, 128 random tokens, loss on every token,
LoRA rank 8 (alpha 16, dropout 0.05) on q_proj and v_proj, backward, global-norm clipping to
1.0, AdamW. Prints the median and fastest of 10 steps after 3 warm-up steps, and peak RSS.
"""
import os, time, resource, statistics, sys
import torch
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
gguf = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), torch_dtype=torch.float32)
cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
model = get_peft_model(model, cfg)
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=g)
times = []
for i in range(13):
    t = time.perf_counter()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t
    if i >= 3: times.append(dt)
print({"torch": torch.__version__, "median_s": statistics.median(times), "min_s": min(times),
       "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
