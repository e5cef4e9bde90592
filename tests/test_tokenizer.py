"""The tokenizer around the model: chat templates from a model folder run sandboxed and fail in one line,
and streamed text reads the same as the whole continuation decoded at once."""

from __future__ import annotations

import json
import shutil

import pytest

from offload.errors import UserError
from offload.tokenizer import StreamDecoder, Tokenizer

TEMPLATE = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"


@pytest.fixture
def folder(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint's tokenizer files, whose chat template each test rewrites."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoint / name, tmp_path / name)
    return tmp_path


def with_template(folder, template):
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = template
    path.write_text(json.dumps(config))
    return Tokenizer(folder, 1, (2,))


def test_a_chat_template_cannot_reach_python(folder, tmp_path_factory):
    """A model folder is often downloaded: its template must not run code (transformers sandboxes it too)."""
    marker = tmp_path_factory.mktemp("side-effect") / "ran"
    tok = with_template(folder, "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}")
    with pytest.raises(UserError, match=r"chat template .*SecurityError"):
        tok.apply_chat_template("hi")
    assert not marker.exists()


@pytest.mark.parametrize("template, needle", [
    ("{{ messages[0]['content'] | frobnicate }}", "No filter named 'frobnicate'"),
    ("{% for m in messages %}", "TemplateSyntaxError"),
    ("{{ raise_exception('only user/assistant turns') }}", "only user/assistant turns"),
])
def test_a_broken_chat_template_is_one_line(folder, template, needle):
    with pytest.raises(UserError, match=needle) as info:
        with_template(folder, template).apply_chat_template("hi")
    assert "\n" not in str(info.value) and "tokenizer_config.json" in str(info.value)


def test_loop_controls_work_as_in_transformers(folder):
    tok = with_template(folder, "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                                "[INST] {{ m['content'] }} [/INST]{% continue %}{% endfor %}")
    assert tok.apply_chat_template("fox") == "[INST] fox [/INST]"


def test_the_template_file_newer_transformers_writes_is_found(folder):
    """transformers >= 4.50 saves the template as chat_template.jinja beside the tokenizer files."""
    tok = with_template(folder, None)
    with pytest.raises(UserError, match="no chat template"):
        tok.apply_chat_template("fox")
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    assert Tokenizer(folder, 1, (2,)).apply_chat_template("fox") == "<s>[INST] fox [/INST]"


@pytest.mark.parametrize("chat", [False, True])
def test_a_prompt_that_is_not_utf8_is_one_line(folder, chat):
    """Bytes that are not UTF-8 reach Python as lone surrogates (sys.argv decodes with surrogateescape)."""
    with pytest.raises(UserError, match=r"^the prompt is not valid UTF-8 \(at character 4\); convert it to UTF-8"):
        Tokenizer(folder, 1, (2,)).encode("The \udce9 fox", chat=chat)


@pytest.fixture(scope="module")
def sentencepiece_folder(tmp_path_factory):
    """A tokenizer built like Mixtral's: '▁' for spaces, byte fallback, and a decoder that strips the
    leading space of whatever it decodes."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("sp")
    tok = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # pieces never span words
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["The capital of France is Paris. The quick brown fox jumps over the dog."] * 20,
                            trainer)
    tok.save(str(folder / "tokenizer.json"))
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # byte fallback: text outside the vocabulary becomes <0xNN> pieces, as in Mixtral's
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder


@pytest.mark.parametrize("prompt, continuation", [
    ("The capital of France is", " Paris. The quick"),
    ("Price:", " 5€ und Grüße 😀 ok"),
])
def test_streamed_pieces_keep_the_first_space_and_whole_characters(sentencepiece_folder, prompt, continuation):
    tok = Tokenizer(sentencepiece_folder, 1, (2,))
    prompt_ids = tok.encode(prompt)
    whole = tok.tok.encode(prompt + continuation, add_special_tokens=False).ids
    generated = whole[len(prompt_ids) - 1:]  # the ids after the prompt's (bos excluded)
    assert tok.decode(prompt_ids + generated) == prompt + continuation
    decoder = StreamDecoder(tok, prompt_ids)
    pieces = [decoder.push(i) for i in generated]
    assert "".join(pieces) == continuation
    assert all("\ufffd" not in p for p in pieces)
