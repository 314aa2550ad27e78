"""Text <-> token ids for byte-level BPE models, loaded from GGUF or Hugging Face files.

The heavy lifting (pre-tokenization, BPE merges, byte-level decoding) is done by the
Rust ``tokenizers`` library; this module only assembles a ``tokenizers.Tokenizer``
that reproduces the model's own tokenizer, and adds the pieces a decoding engine
needs around it: BOS/EOS/PAD ids, id validation and chat-template rendering.

Two sources are supported:

* a llama.cpp GGUF file, whose metadata carries the vocabulary, merges, token types
  and the *name* of the pre-tokenizer (``tokenizer.ggml.pre``); the name is mapped to
  the Hugging Face pre-tokenizer it stands for (see ``_PRE_TOKENIZERS``);
* a Hugging Face model directory (``tokenizer.json`` + ``tokenizer_config.json``, and
  ``generation_config.json`` when present for extra end-of-sequence ids).

``Tokenizer.to_hf_files`` writes the second form, so a tokenizer built from a GGUF can
be saved once and reloaded without the (slow to parse) GGUF file.

Byte-level BPE gives an exact round trip: ``decode(encode(text)) == text`` for every
string, because every byte has a token and the decoder maps tokens back to bytes.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import pathlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import gguf
import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

# Hugging Face's Llama-3 split pattern: at most 3 digits per piece, letters glued to
# one leading non-letter, punctuation runs keep trailing newlines.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
  # ByteLevel's built-in regex is GPT-2's; no prefix space, as in HF's GPT-2 files.
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_gpt2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
  # StarCoder / SmolLM: every digit is its own piece, then GPT-2 splitting.
  return pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])


def _llama3_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
  # The split is done by the explicit regex, so ByteLevel only maps bytes to chars.
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(
          tokenizers.Regex(_LLAMA3_PATTERN), behavior="isolated", invert=False
      ),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])


# llama.cpp pre-tokenizer names (``tokenizer.ggml.pre``) -> the equivalent Hugging
# Face pre-tokenizer. llama.cpp uses "default" when a GGUF names none.
_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _gpt2_pre_tokenizer,
    "gpt2": _gpt2_pre_tokenizer,
    "smollm": _digits_gpt2_pre_tokenizer,
    "starcoder": _digits_gpt2_pre_tokenizer,
    "llama-bpe": _llama3_pre_tokenizer,
    "llama3": _llama3_pre_tokenizer,
    "llama-v3": _llama3_pre_tokenizer,
}


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
  # Jinja's own tojson HTML-escapes <, >, & and '; chat templates expect plain JSON
  # (this is the filter transformers installs), e.g. for tool schemas.
  return json.dumps(
      value,
      ensure_ascii=ensure_ascii,
      indent=indent,
      separators=separators,
      sort_keys=sort_keys,
  )


def _raise_exception(message: str) -> None:
  # Templates call this to reject a conversation (e.g. roles that do not alternate);
  # that is bad caller input, hence ValueError rather than a Jinja error.
  raise ValueError(f"chat template rejected the messages: {message}")


def _strftime_now(fmt: str) -> str:
  # Llama-3.1-style templates print today's date in the system prompt.
  return datetime.datetime.now().strftime(fmt)


def _token_content(token: Any) -> str | None:
  # tokenizer_config.json stores special tokens as strings or as serialized
  # AddedToken dicts ({"content": ..., "lstrip": ..., ...}).
  if token is None or isinstance(token, str):
    return token
  if isinstance(token, Mapping) and isinstance(token.get("content"), str):
    return token["content"]
  raise ValueError(f"cannot read special token {token!r} from tokenizer_config.json")


def _as_id_list(value: Any) -> list[int]:
  if value is None:
    return []
  if isinstance(value, int):
    return [value]
  return [int(v) for v in value]


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Tokenizer:
  """A model's tokenizer: text <-> ids, special ids and its chat template.

  Build one with :meth:`from_gguf` or :meth:`from_hf_dir` rather than directly.

  Attributes:
    backend: the Rust ``tokenizers.Tokenizer`` doing the work. Its post-processor (if
      any, e.g. a BOS-adding template in a Llama-3 ``tokenizer.json``) is never run:
      BOS is added only through ``encode(..., add_bos=True)``.
    bos_id: beginning-of-sequence id, or None if the model has none.
    eos_ids: every id that ends generation (the EOS token first, then e.g. an
      end-of-turn token); may be empty.
    pad_id: padding id, or None if the model has none.
    chat_template: the model's Jinja chat template, or None.
  """

  backend: tokenizers.Tokenizer
  bos_id: int | None
  eos_ids: tuple[int, ...]
  pad_id: int | None
  chat_template: str | None

  def __post_init__(self):
    object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
    named = [("bos_id", self.bos_id), ("pad_id", self.pad_id)]
    named += [("eos_ids", i) for i in self.eos_ids]
    for name, token_id in named:
      if token_id is not None and not 0 <= token_id < self.vocab_size:
        raise ValueError(
            f"{name} {token_id} is outside the vocabulary [0, {self.vocab_size})"
        )

  def __repr__(self) -> str:
    # The backend's own repr is its whole JSON (megabytes of vocabulary).
    template = "None" if self.chat_template is None else f"<{len(self.chat_template)} chars>"
    return (
        f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
        f"eos_ids={self.eos_ids}, pad_id={self.pad_id}, chat_template={template})"
    )

  @property
  def vocab_size(self) -> int:
    """Number of token ids, added (special) tokens included."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  # --------------------------------------------------------------------- loading

  @classmethod
  def from_gguf(cls, path_or_reader: str | os.PathLike | gguf.GGUFReader) -> Tokenizer:
    """Builds the tokenizer stored in a llama.cpp GGUF file's metadata.

    Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are
    supported. Control tokens (token type CONTROL) become special tokens, so their
    text in an input string (e.g. ``<|im_start|>``) encodes to their single id;
    user-defined tokens become plain added tokens.

    Args:
      path_or_reader: path of a ``.gguf`` file, or an open ``gguf.GGUFReader`` (to
        avoid parsing a large file twice when the weights are loaded from it too).

    Returns:
      The tokenizer.

    Raises:
      ValueError: the GGUF has no tokenizer, a tokenizer model other than byte-level
        BPE (e.g. "llama" SentencePiece), an unknown pre-tokenizer name, or a
        malformed vocabulary.
    """
    if isinstance(path_or_reader, gguf.GGUFReader):
      reader = path_or_reader
    else:
      reader = gguf.GGUFReader(path_or_reader)
    keys = gguf.Keys.Tokenizer

    model_name = _field(reader, keys.MODEL)
    if model_name is None:
      raise ValueError("the GGUF file has no tokenizer (no tokenizer.ggml.model)")
    if model_name != "gpt2":
      raise ValueError(
          f"unsupported GGUF tokenizer model {model_name!r}: specjax reads only "
          "byte-level BPE ('gpt2') vocabularies from GGUF; load the model's "
          "Hugging Face tokenizer.json with Tokenizer.from_hf_dir instead"
      )
    pre_name = _field(reader, keys.PRE, "default")
    if pre_name not in _PRE_TOKENIZERS:
      raise ValueError(
          f"unsupported GGUF pre-tokenizer {pre_name!r}; supported: "
          f"{sorted(_PRE_TOKENIZERS)}. Load the model's Hugging Face tokenizer.json "
          "with Tokenizer.from_hf_dir instead"
      )

    tokens: list[str] = _field(reader, keys.LIST)
    token_types: list[int] = _field(reader, keys.TOKEN_TYPE)
    merge_strs: list[str] = _field(reader, keys.MERGES)
    if tokens is None or merge_strs is None:
      raise ValueError("the GGUF tokenizer lacks tokenizer.ggml.tokens or .merges")
    if token_types is None:
      token_types = [gguf.TokenType.NORMAL] * len(tokens)
    if len(token_types) != len(tokens):
      raise ValueError(
          f"GGUF has {len(tokens)} tokens but {len(token_types)} token types"
      )

    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
      seen = set()
      dup = next(t for t in tokens if t in seen or seen.add(t))
      raise ValueError(
          f"GGUF vocabulary repeats token {dup!r}; ids would not round-trip"
      )
    merges = []
    for merge in merge_strs:
      # Byte-level tokens never contain a raw space (it is mapped to "Ġ"), so the
      # single space is an unambiguous separator.
      pair = merge.split(" ")
      if len(pair) != 2:
        raise ValueError(f"malformed GGUF merge {merge!r}: expected 'left right'")
      merges.append((pair[0], pair[1]))

    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    backend.pre_tokenizer = _PRE_TOKENIZERS[pre_name]()
    backend.decoder = decoders.ByteLevel()
    control = [
        tokenizers.AddedToken(tokens[i], special=True, normalized=False)
        for i, t in enumerate(token_types)
        if t == gguf.TokenType.CONTROL
    ]
    user = [
        tokenizers.AddedToken(tokens[i], special=False, normalized=False)
        for i, t in enumerate(token_types)
        if t == gguf.TokenType.USER_DEFINED
    ]
    backend.add_special_tokens(control)
    backend.add_tokens(user)

    eos_ids = []
    for key in (keys.EOS_ID, keys.EOT_ID, keys.EOM_ID):
      token_id = _field(reader, key)
      if token_id is not None and token_id not in eos_ids:
        eos_ids.append(token_id)
    return cls(
        backend=backend,
        bos_id=_field(reader, keys.BOS_ID),
        eos_ids=tuple(eos_ids),
        pad_id=_field(reader, keys.PAD_ID),
        chat_template=_field(reader, keys.CHAT_TEMPLATE),
    )

  @classmethod
  def from_hf_dir(cls, directory: str | os.PathLike) -> Tokenizer:
    """Loads a Hugging Face model directory's tokenizer.

    Reads ``tokenizer.json``; ``tokenizer_config.json`` (optional) for the chat
    template and the bos/eos/pad tokens; ``chat_template.jinja`` when the config has
    no template; and ``generation_config.json`` (optional) for further
    end-of-generation ids (e.g. Llama 3's ``<|eot_id|>``).

    Args:
      directory: the model directory.

    Returns:
      The tokenizer.

    Raises:
      FileNotFoundError: there is no ``tokenizer.json``.
      ValueError: a special token named in the config is not in the vocabulary.
    """
    directory = pathlib.Path(directory)
    backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))

    def read_json(name: str) -> dict[str, Any]:
      path = directory / name
      return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    config = read_json("tokenizer_config.json")
    gen_config = read_json("generation_config.json")

    def token_id(key: str) -> int | None:
      content = _token_content(config.get(key))
      if content is None:
        return None
      token_id = backend.token_to_id(content)
      if token_id is None:
        raise ValueError(f"{key} {content!r} is not in the vocabulary of {directory}")
      return token_id

    bos_id = token_id("bos_token")
    if bos_id is None:
      bos_id = gen_config.get("bos_token_id")
    pad_id = token_id("pad_token")
    if pad_id is None:
      pad_id = gen_config.get("pad_token_id")
    eos_ids = _as_id_list(token_id("eos_token"))
    for i in _as_id_list(gen_config.get("eos_token_id")):
      if i not in eos_ids:
        eos_ids.append(i)

    template = config.get("chat_template")
    if isinstance(template, list):
      # Several named templates (e.g. "default", "tool_use"); the default is the one
      # used for plain conversations.
      named = {t["name"]: t["template"] for t in template}
      template = named.get("default")
    if template is None and (directory / "chat_template.jinja").exists():
      template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return cls(
        backend=backend,
        bos_id=bos_id,
        eos_ids=tuple(eos_ids),
        pad_id=pad_id,
        chat_template=template,
    )

  def to_hf_files(self, directory: str | os.PathLike) -> None:
    """Writes the tokenizer as Hugging Face files that :meth:`from_hf_dir` reloads.

    Writes ``tokenizer.json`` and ``tokenizer_config.json`` (chat template and
    bos/eos/pad tokens), and sets ``bos_token_id``/``eos_token_id``/``pad_token_id``
    in ``generation_config.json``, keeping any other keys already there, because a
    tokenizer config can name only one EOS token.

    Args:
      directory: where to write; created if missing.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self.backend.save(str(directory / "tokenizer.json"))

    def content(token_id: int | None) -> str | None:
      return None if token_id is None else self.backend.id_to_token(token_id)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": content(self.bos_id),
        "eos_token": content(self.eos_ids[0] if self.eos_ids else None),
        "pad_token": content(self.pad_id),
        # transformers would otherwise strip spaces before punctuation on decode,
        # breaking the exact round trip.
        "clean_up_tokenization_spaces": False,
        "chat_template": self.chat_template,
    }
    (directory / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )

    gen_path = directory / "generation_config.json"
    gen_config = (
        json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.exists() else {}
    )
    eos: int | list[int] | None = list(self.eos_ids) or None
    if eos is not None and len(eos) == 1:
      eos = eos[0]
    gen_config.update(
        bos_token_id=self.bos_id, eos_token_id=eos, pad_token_id=self.pad_id
    )
    gen_path.write_text(json.dumps(gen_config, indent=2) + "\n", encoding="utf-8")

  # ------------------------------------------------------------ text <-> ids

  def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
    """Tokenizes one string.

    Special tokens written in the text (e.g. ``"<|im_start|>"``) are parsed as
    special: each becomes its single control id, exactly as in a rendered chat
    template. Do not pass untrusted text that must stay literal through here
    without escaping it first.

    Args:
      text: the string.
      add_bos: prepend ``bos_id``. Off by default because chat templates already
        write the BOS token themselves where the model wants one.

    Returns:
      The token ids.

    Raises:
      ValueError: ``add_bos`` is set but the model has no BOS token.
    """
    ids = self.backend.encode(text, add_special_tokens=False).ids
    return self._bos_prefix(add_bos) + ids

  def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False) -> list[list[int]]:
    """Tokenizes many strings in parallel (Rust threads); see :meth:`encode`.

    Args:
      texts: the strings.
      add_bos: prepend ``bos_id`` to each.

    Returns:
      One list of token ids per string.
    """
    prefix = self._bos_prefix(add_bos)
    # The "fast" variant skips character offsets, which nothing here needs.
    encodings = self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
    return [prefix + e.ids for e in encodings]

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
    """Turns token ids back into text.

    A sequence that ends inside a multi-byte UTF-8 character decodes that partial
    character to U+FFFD; callers streaming text should hold back such a tail.

    Args:
      ids: token ids, a list or a 1-D integer array.
      skip_special_tokens: drop control tokens (e.g. ``<|im_end|>``) from the text.

    Returns:
      The text.

    Raises:
      ValueError: an id is outside ``[0, vocab_size)``, or ``ids`` is not 1-D.
    """
    return self.backend.decode(
        self._checked_ids(ids), skip_special_tokens=skip_special_tokens
    )

  def decode_batch(
      self, batch: Iterable[Iterable[int]], *, skip_special_tokens: bool = False
  ) -> list[str]:
    """Decodes several id sequences; see :meth:`decode`.

    Args:
      batch: one id sequence per text.
      skip_special_tokens: drop control tokens from the texts.

    Returns:
      One string per sequence.
    """
    checked = [self._checked_ids(ids) for ids in batch]
    return self.backend.decode_batch(checked, skip_special_tokens=skip_special_tokens)

  # ------------------------------------------------------------ chat template

  def apply_chat_template(
      self,
      messages: Sequence[Mapping[str, Any]],
      *,
      add_generation_prompt: bool = True,
      tokenize: bool = True,
      **template_vars: Any,
  ) -> list[int] | str:
    """Renders a conversation with the model's chat template.

    Rendering follows transformers: a sandboxed Jinja environment with
    ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, a plain-JSON
    ``tojson`` filter, ``raise_exception`` and ``strftime_now`` globals, and the
    ``bos_token``/``eos_token``/``pad_token`` strings as variables.

    Args:
      messages: the conversation, e.g. ``[{"role": "user", "content": "Hi"}]``.
      add_generation_prompt: end with the header that opens the assistant's turn.
      tokenize: return token ids (of the rendered text, no extra BOS) instead of
        the text.
      **template_vars: further template variables (e.g. ``tools=...``).

    Returns:
      The token ids, or the rendered text if ``tokenize`` is False.

    Raises:
      ValueError: the model has no chat template, a message is not a mapping with
        a "role", or the template rejects the conversation.
    """
    if self.chat_template is None:
      raise ValueError(
          "this model has no chat template; build the prompt text yourself and "
          "call encode()"
      )
    for i, message in enumerate(messages):
      if not isinstance(message, Mapping) or "role" not in message:
        raise ValueError(f"message {i} must be a mapping with a 'role', got {message!r}")
    special = {
        "bos_token": self.bos_id,
        "eos_token": self.eos_ids[0] if self.eos_ids else None,
        "pad_token": self.pad_id,
    }
    for name, token_id in special.items():
      if token_id is not None:
        template_vars.setdefault(name, self.backend.id_to_token(token_id))
    text = self._compiled_template.render(
        messages=list(messages),
        add_generation_prompt=add_generation_prompt,
        **template_vars,
    )
    return self.encode(text) if tokenize else text

  # ------------------------------------------------------------------ helpers

  @functools.cached_property
  def _compiled_template(self) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(self.chat_template)

  def _bos_prefix(self, add_bos: bool) -> list[int]:
    if not add_bos:
      return []
    if self.bos_id is None:
      raise ValueError("add_bos=True but this model has no BOS token")
    return [self.bos_id]

  def _checked_ids(self, ids: Iterable[int]) -> list[int]:
    # Arrays (numpy, jax) convert directly; anything else may be a one-shot iterator.
    array = np.asarray(ids if hasattr(ids, "__array__") else list(ids))
    if array.size == 0:
      return []
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
      raise ValueError(
          f"token ids must be a 1-D sequence of integers, got shape {array.shape} "
          f"dtype {array.dtype}"
      )
    bad = array[(array < 0) | (array >= self.vocab_size)]
    if bad.size:
      raise ValueError(
          f"token id {int(bad[0])} is outside the vocabulary [0, {self.vocab_size}); "
          f"vocab_size is {self.vocab_size}"
      )
    return array.tolist()
