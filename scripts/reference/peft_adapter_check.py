"""Checks fedtune's PEFT export against the real PEFT library (not run in CI: it needs PyTorch).

Usage: python peft_adapter_check.py MODEL.gguf ADAPTER_DIR MERGED_DIR FEDTUNE_BINARY
where ADAPTER_DIR came from `fedtune lora --save-adapter` and MERGED_DIR from `fedtune merge`.
Loads the adapter with `peft.PeftModel.from_pretrained` on the GGUF base (transformers
dequantizes it), scores one text and prints the mean next-token NLL next to fedtune's score of
its own merged model and transformers' score of that merged folder; the three agree when the
tensor names, orientation and scaling of the export are right.
"""
import json, os, sys, subprocess
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
from safetensors.torch import load_file
gguf, adapter, merged, fedtune = sys.argv[1:5]
text = "ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
ids = json.loads(subprocess.check_output([fedtune, "tokenize", "--model", gguf, "--json", text]))["ids"]
ours = json.loads(subprocess.check_output([fedtune, "score", "--model", merged, "--json", text]))["mean_next_token_nll"]
base = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32)
x = torch.tensor([ids])
with torch.no_grad():
    plain = base(input_ids=x, labels=x).loss.item()
tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
bnorm = sum(float(v.norm()) for k, v in tensors.items() if "lora_B" in k)
print("adapter tensors", len(tensors), "e.g.", sorted(tensors)[:2], "sum |B|", round(bnorm, 4))
print("adapter_config", json.load(open(os.path.join(adapter, "adapter_config.json"))))
peft = PeftModel.from_pretrained(base, adapter)
peft.eval()
with torch.no_grad():
    with_adapter = peft(input_ids=x, labels=x).loss.item()
m = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
with torch.no_grad():
    hf_merged = m(input_ids=x, labels=x).loss.item()
print(json.dumps({"base_nll": plain, "peft_nll": with_adapter, "fedtune_merged_nll": ours,
                  "transformers_on_fedtune_merged_nll": hf_merged,
                  "peft_vs_fedtune": abs(with_adapter - ours)}))
