"""Random-weight checkpoints with the real 7B shapes, written by transformers (for the GPU machine).

llava-1.5-7b-hf: CLIP ViT-L/14-336 + Vicuna-7B (Llama, 32 heads, no GQA).
llava-v1.6-mistral-7b-hf: the same tower + Mistral-7B (GQA 32/8, rope theta 1e6), anyres pinpoints.
Tokenizer and processor configs come from the tiny fixtures, which use the same Llama-2 vocabulary.
"""
import os, shutil, time

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration

VISION = dict(model_type="clip_vision_model", hidden_size=1024, image_size=336, intermediate_size=4096,
              num_attention_heads=16, num_hidden_layers=24, patch_size=14, projection_dim=768)
COMMON = dict(image_token_index=32000, pad_token_id=32001, vocab_size=32064, projector_hidden_act="gelu",
              vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False)
FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
         "processor_config.json"]


def _save(model, path, fixture):
    model.eval()
    t = time.time()
    model.save_pretrained(path)
    for f in FILES:
        if os.path.exists(f"{fixture}/{f}"):
            shutil.copy(f"{fixture}/{f}", path)
    print(f"saved {path} in {time.time() - t:.1f}s", flush=True)
    return model


def llava15(path):
    config = LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
        vision_config=VISION, **COMMON)
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    return _save(model, path, "fixtures/llava-tiny-real")


def llava_next_mistral(path):
    config = LlavaNextConfig(
        text_config=dict(model_type="mistral", vocab_size=32064, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None),
        vision_config=VISION,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], **COMMON)
    config.architectures = ["LlavaNextForConditionalGeneration"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlavaNextForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    return _save(model, path, "fixtures/llava-next-tiny-real")
