"""Build a tiny Llama-architecture model on this machine, with no model hub.

The tests, `make serve` and the benchmark all serve it with the real vLLM engine. It has random
(seeded) weights, so its text is gibberish, but every code path a real chat model takes is there:
a byte-level BPE tokenizer trained here, a chat template in tokenizer_config.json, safetensors
weights, an EOS token. Shapes follow FIELD_NOTES section 4 (vLLM's CPU attention needs head_dim 32).

    python -m tools.tiny_model build/tiny-llama
"""

import json
import random
import sys
from pathlib import Path

# Bump when the recipe changes, so cached copies are rebuilt.
RECIPE_VERSION = "1"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORDS = (
    "the a model answer question token stream request server cluster worker head replica ray serve "
    "vllm engine batch prompt reply hello world count one two three four five six seven eight nine "
    "ten fast slow small large red green blue river mountain city light dark day night time data "
    "is are was were be have has do does say said make go come see know think take give find tell "
    "and or but if then because so while when where who what which how why not no yes very more "
    "most many much few little good new first last long great own other old right big high"
).split()


def _training_text(lines=4000, seed=0):
    """A fixed, seeded corpus: the same tokenizer on every machine."""
    rng = random.Random(seed)
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        yield " ".join(words).capitalize() + rng.choice([".", "!", "?", ","])


# The tiny model's shape (FIELD_NOTES section 4): 336k parameters, prefill of anything in a millisecond.
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1}
# A model where prefill costs something (the routing benchmark, bench/routing.py): about 26M
# parameters, head_dim 64, random weights all the same.
BENCH_SHAPE = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
               "num_key_value_heads": 2}


def build(target, vocab_size=2048, seed=0, shape=None):
    """Write the model into `target` (a folder) unless an up-to-date copy is there; return its path.
    `shape` overrides TINY_SHAPE's Llama sizes."""
    target = Path(target)
    marker = target / "tiny_model_recipe.json"
    shape = {**TINY_SHAPE, **(shape or {})}
    if marker.exists() and json.loads(marker.read_text()).get("version") == RECIPE_VERSION \
            and json.loads(marker.read_text()).get("shape", TINY_SHAPE) == shape:
        return target

    # Heavy imports stay here, so importing this module for RECIPE_VERSION costs nothing.
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    target.mkdir(parents=True, exist_ok=True)
    special = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_training_text(seed=seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(target)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        **shape,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.token_to_id("<s>"),
        eos_token_id=tokenizer.token_to_id("</s>"),
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target, safe_serialization=True)
    marker.write_text(json.dumps({"version": RECIPE_VERSION, "seed": seed, "shape": shape}))
    return target


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "build/tiny-llama"))
