"""Random-weight checkpoints with the real 7B shapes, written by transformers (for the GPU machine).

llava-1.5-7b-hf: CLIP ViT-L/14-336 + Vicuna-7B (Llama, 32 heads, no GQA), with the Llama-2 tokenizer of the
tiny fixture (the same vocabulary plus `<image>` = 32000 and `<pad>` = 32001).
llava-v1.6-mistral-7b-hf: the same tower + Mistral-7B (GQA 32/8, rope theta 1e6), anyres pinpoints, with
Mistral's tokenizer (fixtures/tokenizers/mistral) extended the same way, as llava-hf's is.
A checkpoint already complete at its path (a warm machine) is loaded instead of written again.
"""
import os, shutil, time

import torch
from transformers import (AddedToken, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                          LlavaNextForConditionalGeneration, PreTrainedTokenizerFast)

VISION = dict(model_type="clip_vision_model", hidden_size=1024, image_size=336, intermediate_size=4096,
              num_attention_heads=16, num_hidden_layers=24, patch_size=14, projection_dim=768)
COMMON = dict(image_token_index=32000, pad_token_id=32001, vocab_size=32064, projector_hidden_act="gelu",
              vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False)
MISTRAL_TEXT = dict(model_type="mistral", vocab_size=32064, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None)
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
DONE = "checkpoint-complete"  # written last: a checkpoint without it was cut short and is written again


def mistral_tokenizer():
    """Mistral-7B's tokenizer with `<image>` = 32000 and `<pad>` = 32001 added as special tokens.
    Built on tokenizer.json as written (transformers 5's LlamaTokenizer would rebuild its pipeline)."""
    tok = PreTrainedTokenizerFast(tokenizer_file="fixtures/tokenizers/mistral/tokenizer.json", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": [AddedToken("<image>", special=True, normalized=False)]})
    tok.add_special_tokens({"pad_token": AddedToken("<pad>", special=True, normalized=False)})
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001], "unexpected added token ids"
    return tok


def _make(cls, config, path, files, tokenizer=None, device="cuda"):
    """The checkpoint at `path`: loaded if complete, else made with seed 0 and saved with the processor's files
    (`files`: {source: name}) and the tokenizer (if given; else its files are among `files`)."""
    if os.path.exists(f"{path}/{DONE}"):
        return cls.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()  # device_map needs accelerate
    shutil.rmtree(path, ignore_errors=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, dtype=torch.bfloat16).eval()
    t = time.time()
    model.save_pretrained(path)
    for source, name in files.items():
        shutil.copy(source, f"{path}/{name}")
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    open(f"{path}/{DONE}", "w").close()
    print(f"saved {path} in {time.time() - t:.1f}s", flush=True)
    return model


def _fixture_files(fixture, names):
    return {f"{fixture}/{n}": n for n in names if os.path.exists(f"{fixture}/{n}")}


def llava15_config():
    config = LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
        vision_config=VISION, **COMMON)
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def llava_next_mistral_config(text=MISTRAL_TEXT, vision=VISION):
    config = LlavaNextConfig(text_config=text, vision_config=vision, image_grid_pinpoints=PINPOINTS, **COMMON)
    config.architectures = ["LlavaNextForConditionalGeneration"]
    return config


def llava15(path):
    files = _fixture_files("fixtures/llava-tiny-real", ["tokenizer.json", "tokenizer_config.json",
                                                        "special_tokens_map.json", "preprocessor_config.json",
                                                        "processor_config.json"])
    return _make(LlavaForConditionalGeneration, llava15_config(), path, files)


def llava_next_mistral(path, config=None, device="cuda"):
    """config, device: a smaller LlavaNextConfig on the CPU, for a dry run of the files without the 7B."""
    files = _fixture_files("fixtures/llava-next-tiny-real", ["preprocessor_config.json", "processor_config.json"])
    return _make(LlavaNextForConditionalGeneration, config or llava_next_mistral_config(), path, files,
                 mistral_tokenizer(), device)
