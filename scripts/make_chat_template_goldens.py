"""Goldens for `mmreg serve`'s chat templates: what transformers renders for OpenAI-style conversations.

Each `fixtures/chat-templates/*.jinja` is a hub template (see that folder's README for where each one's
text comes from). For every conversation below, transformers' processor `apply_chat_template(messages,
tokenize=False, add_generation_prompt=...)` renders the prompt: the processor's own code rewrites
OpenAI's `image_url` parts into `{"type": "image", "url": ...}` before the template sees them, as the
server must. The Rust test `serve::chat_template::tests::renders_like_transformers` checks mmreg's
rendering (minijinja) against `goldens.json`.

Run from the repository root (no torch needed; transformers==5.17.0 and jinja2):

    python3 -m venv ~/.cache/mmreg/pydev-serve
    ~/.cache/mmreg/pydev-serve/bin/pip install transformers==5.17.0 jinja2
    ~/.cache/mmreg/pydev-serve/bin/python scripts/make_chat_template_goldens.py
"""

import json
import pathlib
import sys

import jinja2
import transformers
from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "chat-templates"
TEMPLATES = ["llava-1.5", "llava-v1.6-mistral", "qwen2-vl-instruct"]

IMAGE_A = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
IMAGE_B = {"type": "image_url", "image_url": {"url": "https://images.example/b.png"}}


def text(t):
    return {"type": "text", "text": t}


# (name, messages, add_generation_prompt); content in OpenAI's parts form, which every one of these
# templates takes (a plain-string content is handed to such templates as one text part by the server).
CASES = [
    ("one_image", [{"role": "user", "content": [IMAGE_A, text("What is shown in this image?")]}], True),
    ("text_only", [{"role": "user", "content": [text("Say something.")]}], True),
    (
        "text_after_image_twice",
        [{"role": "user", "content": [text("Compare"), IMAGE_A, text(" these:"), IMAGE_B]}],
        True,
    ),
    (
        "multi_turn",
        [
            {"role": "user", "content": [IMAGE_A, text("What is this?")]},
            {"role": "assistant", "content": [text("A red circle.")]},
            {"role": "user", "content": [IMAGE_B, text("And this one? Answer in \"quotes\" & <tags>.")]},
        ],
        True,
    ),
    ("no_generation_prompt", [{"role": "user", "content": [text("Hi")]}], False),
]
# LLaVA-NeXT's template raises for a system message's string form and Qwen2-VL adds its own system
# prompt only without one: a system turn, for the templates that take one.
SYSTEM_CASE = (
    "with_system",
    [
        {"role": "system", "content": [text("You are terse.")]},
        {"role": "user", "content": [IMAGE_A, text("Describe.")]},
    ],
    True,
)


def main():
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "fixtures" / "llava-tiny-real")
    goldens = {
        "made_by": "scripts/make_chat_template_goldens.py",
        "versions": {
            "python": sys.version.split()[0],
            "transformers": transformers.__version__,
            "jinja2": jinja2.__version__,
        },
        "special_tokens": tokenizer.special_tokens_map,
        "templates": {},
    }
    for name in TEMPLATES:
        template = (OUT / f"{name}.jinja").read_text()
        # Any processor class runs ProcessorMixin.apply_chat_template; the template is what differs.
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessor(),
            tokenizer=tokenizer,
            chat_template=template,
            patch_size=14,
            vision_feature_select_strategy="default",
        )
        cases = {}
        for case, messages, add_generation_prompt in CASES + [SYSTEM_CASE]:
            prompt = processor.apply_chat_template(
                json.loads(json.dumps(messages)),  # the processor rewrites image parts in place
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
            cases[case] = {
                "messages": messages,
                "add_generation_prompt": add_generation_prompt,
                "prompt": prompt,
            }
        goldens["templates"][name] = cases
    (OUT / "goldens.json").write_text(json.dumps(goldens, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT / 'goldens.json'}")


if __name__ == "__main__":
    main()
