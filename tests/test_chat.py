"""Conversations, several media and text-only prompts against transformers' `generate` (greedy).

Turn k's reference prompt is built here independently: turn k-1's prompt ids + the ids
transformers generated + the tokenised `<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n`.
The original-format checkpoint holds the same weights as the HF-format one transformers reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import tiny
import torch
from media_factory import make_image, make_video
from tokenizers import Tokenizer

import vl3cli
from vl3cli.errors import ContextError, Vl3Error
from vl3cli.preprocess import prepare_visual

N = 8
QUESTIONS = ["What is shown?", "And what colour is it?", "Say it again."]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-ckpt")
    return {fmt: tiny.make_checkpoint(root / fmt, fmt, tied=False, seed=5) for fmt in ("hf", "original")}


@pytest.fixture(scope="module")
def ref(ckpt):
    return tiny.hf_reference(ckpt["hf"])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-media")
    return {
        "image": make_image(root / "a.png", size=(56, 56)),
        "image2": make_image(root / "b.jpg", size=(70, 42), fmt="JPEG", seed=7),
        "video": make_video(root / "c.mp4", seconds=3.0, fps=4, size=(56, 56)),
    }


@pytest.fixture(scope="module")
def models(ckpt):
    return {fmt: vl3cli.load(str(path), dtype="float32", max_new_tokens=N) for fmt, path in ckpt.items()}


def tok() -> Tokenizer:
    return Tokenizer.from_str(tiny.tokenizer_json())


def reference_inputs(model, paths):
    """Placeholder text and transformers' visual inputs, from vl3's pre-processing of `paths`."""
    processor = model.engine.processor
    texts, images, videos = [], [], []
    for path in paths:
        v = prepare_visual(str(path), processor, model.options().media(processor))
        if v.kind == "image":
            texts.append("<|image_pad|>" * v.visual_tokens_kept)
            images.append(v)
        else:
            texts.append(",".join(f"Time {t:.1f}s:" + "<|video_pad|>" * n for t, n in zip(v.timestamps, v.tokens_per_frame)))
            videos.append(v)
    inputs = {}
    if images:
        inputs |= {"pixel_values": torch.cat([v.pixel_values for v in images]),
                   "image_grid_thw": torch.tensor([v.grid_thw for v in images]),
                   "image_merge_sizes": torch.tensor([v.merge_size for v in images])}  # fmt: skip
    for v in videos:
        keep = v.keep if v.keep is not None else torch.ones(v.visual_tokens, dtype=torch.bool)
        inputs |= {"pixel_values_videos": v.pixel_values, "video_grid_thw": torch.tensor([v.grid_thw]),
                   "video_merge_sizes": torch.tensor([v.merge_size]), "video_compression_mask": keep}  # fmt: skip
    return "".join(t + "\n" for t in texts), inputs


def generate(ref, ids: list[int], inputs: dict, eos: list[int], folder) -> list[int]:
    with torch.inference_mode():
        out = ref.generate(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False, max_new_tokens=N, eos_token_id=eos, pad_token_id=0, suppress_tokens=tiny.placeholder_ids(folder), **inputs,
        )[0, len(ids):].tolist()  # fmt: skip
    return [t for t in out if t not in eos]


def eos_ids(folder: Path) -> list[int]:
    return json.loads((folder / "generation_config.json").read_text())["eos_token_id"]


@pytest.mark.parametrize("fmt", ["hf", "original"])
@pytest.mark.parametrize("kind", ["image", "video"])
def test_three_turns_equal_transformers(fmt, kind, models, ref, ckpt, files):
    model = models[fmt]
    visual, inputs = reference_inputs(model, [files[kind]])
    t = tok()
    ids = t.encode(f"<|im_start|>user\n{visual}{QUESTIONS[0]}<|im_end|>\n<|im_start|>assistant\n").ids
    chat = model.chat(str(files[kind]))
    generated, expected = 0, []
    for k, question in enumerate(QUESTIONS):
        if k:
            ids = ids + expected + t.encode(f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n").ids
        expected = generate(ref, ids, inputs, eos_ids(ckpt[fmt]), ckpt[fmt])
        r = chat.ask(question)
        assert r.state.ids == expected, (k, r.text)
        assert r.prompt_tokens == len(ids) and r.prompt == question and r.media == [str(files[kind])]
        generated += len(expected)
    assert generated >= 2 * N  # real answers, not empty ones


@pytest.mark.parametrize("fmt", ["hf", "original"])
def test_two_images_and_text_only_equal_transformers(fmt, models, ref, ckpt, files):
    model = models[fmt]
    paths = [files["image"], files["image2"]]
    visual, inputs = reference_inputs(model, paths)
    question = "What changed?"
    ids = tok().encode(f"<|im_start|>user\n{visual}{question}<|im_end|>\n<|im_start|>assistant\n").ids
    (r,) = model.ask([str(p) for p in paths], question)
    assert r.state.ids == generate(ref, ids, inputs, eos_ids(ckpt[fmt]), ckpt[fmt])
    assert r.kind == "multiple" and r.path is None and [m["path"] for m in r.media_info] == [str(p) for p in paths]
    assert r.visual_tokens == sum(m["visual_tokens"] for m in r.media_info)
    text_q = "What color is a banana?"
    ids = tok().encode(f"<|im_start|>user\n{text_q}<|im_end|>\n<|im_start|>assistant\n").ids
    (r,) = model.ask([], text_q)
    assert r.state.ids == generate(ref, ids, {}, eos_ids(ckpt[fmt]), ckpt[fmt])
    assert r.kind == "text" and r.media == [] and r.visual_tokens == 0


def test_reset_and_save(models, files, tmp_path):
    chat = models["hf"].chat(str(files["image"]))
    first = chat.ask(QUESTIONS[0])
    chat.ask(QUESTIONS[1])
    # only the conversation's latest KV is kept: no earlier turn's copy rides on its Result
    assert chat.prefix is not None
    assert all(r.state.prefix is None and r.state.item.prefix is None for r in chat.results)
    chat.reset()
    again = chat.ask(QUESTIONS[0])
    assert again.text == first.text and again.prompt_tokens == first.prompt_tokens
    assert again.timings["media_s"] == 0.0  # the media was read once, before the reset
    out = tmp_path / "talk.json"
    chat.save(out)
    saved = json.loads(out.read_text())
    assert [t["question"] for t in saved["turns"]] == [QUESTIONS[0]] and saved["media"] == [str(files["image"])]
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(vl3cli.api.UsageError, match="not a saved vl3 chat"):
        chat.save(notes)
    assert notes.read_text() == "mine"
    chat.save(out)  # a saved chat is replaced
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(vl3cli.api.UsageError, match="not a saved vl3 chat"):
        chat.save(fifo)  # refused without being opened (reading it would block)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_questions_share_their_media_prefix_and_answer_as_alone(models, files, kind):
    """Three questions about one file: the common start (the media) is prefilled once; each answer
    equals the question asked on its own (greedy, float32)."""
    model = models["original"]
    questions = ["What is shown?", "Which colours?", "Is anything moving?"]
    together = model.ask(str(files[kind]), questions)
    alone = [model.ask(str(files[kind]), q)[0] for q in questions]
    assert [r.state.ids for r in together] == [r.state.ids for r in alone]
    assert [r.prompt_tokens for r in together] == [r.prompt_tokens for r in alone]
    shared = together[1].prompt_tokens_cached
    assert alone[0].prompt_tokens_cached == together[0].prompt_tokens_cached == 0
    assert shared == together[2].prompt_tokens_cached and shared >= together[0].visual_tokens_kept


def test_a_conversation_prefills_only_its_new_turn(models, files):
    chat = models["hf"].chat(str(files["video"]))
    first = chat.ask(QUESTIONS[0])
    second = chat.ask(QUESTIONS[1])
    assert first.prompt_tokens_cached == 0
    # everything before the new turn came from the kept KV: the first prompt and the answer fed back
    assert second.prompt_tokens_cached == first.prompt_tokens + len(first.state.ids) - (first.finish_reason == "length")
    assert second.timings["encode_s"] == 0.0  # the video was not encoded again


def test_save_is_whole_or_not_at_all(models, files, tmp_path, monkeypatch):
    """A media name that is not UTF-8 is saved as its JSON escape (and reads back as it was); a
    save that fails part way (a full disk) leaves the earlier save as it was."""
    out = tmp_path / "talk.json"
    chat = models["hf"].chat(str(files["image"]))
    chat.ask(QUESTIONS[0])
    chat.save(out)
    earlier = out.read_bytes()
    odd = tmp_path / os.fsdecode(b"\xe9t\xe9.png")  # Latin-1 bytes: '\udce9t\udce9.png' under surrogateescape
    odd.write_bytes(files["image"].read_bytes())
    other = models["hf"].chat(str(odd))
    other.ask(QUESTIONS[0])

    real_open = Path.open

    class Full:  # a file on a full disk: opened, then every write fails
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def opened(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        return Full(f) if "w" in mode else f

    with monkeypatch.context() as m:
        m.setattr(Path, "open", opened)
        with pytest.raises(Vl3Error, match="cannot write .*No space left"):
            other.save(out)
    assert out.read_bytes() == earlier and sorted(os.listdir(tmp_path)) == sorted([out.name, odd.name])  # no file left behind
    other.save(out)
    saved = json.loads(out.read_bytes().decode("utf-8"))  # valid UTF-8
    assert saved["media"] == [str(odd)] and saved["turns"][0]["record"]["path"] == str(odd)


def test_a_question_that_is_not_utf8_is_refused_and_the_chat_goes_on(models, files):
    chat = models["hf"].chat(str(files["image"]))
    with pytest.raises(vl3cli.api.UsageError, match="not valid UTF-8"):
        chat.ask("what is \udcff\udcfe?")  # a terminal's Latin-1 bytes, as surrogateescape reads them
    assert chat.history == [] and chat.ask(QUESTIONS[0]).ok


def test_a_first_question_that_fails_does_not_read_the_media_again(models, files, monkeypatch):
    from vl3cli import pipeline

    reads = []
    real = pipeline.prepare_visual
    monkeypatch.setattr(pipeline, "prepare_visual", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    chat = models["hf"].chat(str(files["video"]))
    with pytest.raises(ContextError):
        chat.ask("w " * 5000)
    assert chat.ask(QUESTIONS[0]).ok and chat.ask(QUESTIONS[1]).ok
    assert reads == [str(files["video"])]


def test_a_resumed_conversation_goes_on_as_the_saved_one_would(models, ref, ckpt, files, tmp_path):
    """Two questions, /save, then a new chat resuming the file: the third answer is the one the
    unbroken conversation gives (the answers' saved ids, not their text), and a second save holds
    all three turns. Saved by another model, the answers are taken as text: the prompt is then
    the layout of the texts, and the answer transformers' for it."""
    from vl3cli.chat import saved_chat

    model = models["hf"]
    talk = model.chat(str(files["video"]))
    for question in QUESTIONS[:2]:
        talk.ask(question)
    saved = tmp_path / "talk.json"
    talk.save(saved)
    third = talk.ask(QUESTIONS[2])
    assert saved_chat(saved) == {"media": [str(files["video"])], "system": None}
    again = model.chat(**saved_chat(saved))
    again.resume(saved)
    r = again.ask(QUESTIONS[2])
    assert (r.state.ids, r.prompt_tokens) == (third.state.ids, third.prompt_tokens)
    again.save(tmp_path / "all.json")
    turns = json.loads((tmp_path / "all.json").read_text())["turns"]
    assert [t["question"] for t in turns] == QUESTIONS and turns[2]["ids"] == third.state.ids
    from vl3cli.pipeline import Item

    assert Item(history=tuple(again.history)).to_read == ()  # the media read for that question is kept

    data = json.loads(saved.read_text())
    data["model"] = "another/model"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data, indent=2))
    answers = [t["answer"] for t in data["turns"]]
    visual, inputs = reference_inputs(model, [files["video"]])
    layout = (f"<|im_start|>user\n{visual}{QUESTIONS[0]}<|im_end|>\n<|im_start|>assistant\n{answers[0]}<|im_end|>\n"
              f"<|im_start|>user\n{QUESTIONS[1]}<|im_end|>\n<|im_start|>assistant\n{answers[1]}<|im_end|>\n"
              f"<|im_start|>user\n{QUESTIONS[2]}<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    ids = tok().encode(layout).ids
    texts = model.chat(str(files["video"]))
    texts.resume(other)
    r = texts.ask(QUESTIONS[2])
    assert r.prompt_tokens == len(ids)
    assert r.state.ids == generate(ref, ids, inputs, eos_ids(ckpt["hf"]), ckpt["hf"])


def test_resuming_what_is_not_a_saved_conversation_is_one_usage_error(models, files, tmp_path):
    from vl3cli.chat import saved_chat
    from vl3cli.errors import UsageError

    model = models["hf"]
    talk = model.chat(str(files["image"]))
    talk.ask(QUESTIONS[0])
    saved = tmp_path / "talk.json"
    talk.save(saved)
    (tmp_path / "notes.json").write_text('{"turns": []}')
    damaged = tmp_path / "damaged.json"
    damaged.write_text(saved.read_text().replace('"turns": [', '"turns": [7, '))
    for path, message in [(tmp_path / "none.json", "no such file"), (tmp_path / "notes.json", "is not a conversation saved by vl3"),
                          (damaged, "the saved conversation is damaged")]:  # fmt: skip
        with pytest.raises(UsageError, match=message):
            saved_chat(path)
    with pytest.raises(UsageError, match=r"is a conversation about .*a\.png, not .*b\.jpg"):
        model.chat(str(files["image2"])).resume(saved)
    with pytest.raises(UsageError, match="another system prompt"):
        model.chat(str(files["image"]), system="Be brief.").resume(saved)
    with pytest.raises(UsageError, match="in a new chat"):
        talk.resume(saved)
