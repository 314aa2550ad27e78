"""The chat workloads of experiments/workloads.py: deterministic, well-formed, offline."""

import ast
import io
import json
import re

import gguf
import pytest

from experiments import workloads
from specjax.tokenizer import Tokenizer

_FENCE = re.compile(r"```python\n(.*?)\n```", re.DOTALL)


@pytest.fixture(scope="module")
def stdlib_text() -> str:
  return "\n".join(p.read_text(encoding="utf-8", errors="replace")
                   for p in workloads.stdlib_files())


@pytest.fixture(scope="module")
def code_edits():
  return workloads.code_edit_requests(12, seed=1, max_chars=1500)


@pytest.fixture(scope="module")
def agentic():
  return workloads.agentic_requests(10, seed=1)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
  """Only the tokenizer (and context length) of the GGUF: no weights to load."""
  reader = gguf.GGUFReader(smollm2_path)
  return Tokenizer.from_gguf(reader), int(reader.fields["llama.context_length"].contents())


@pytest.mark.parametrize("build", [workloads.code_edit_requests,
                                   workloads.agentic_requests,
                                   workloads.chat_requests])
def test_requests_are_seeded_and_counted(build):
  first, again, other = build(7, seed=5), build(7, seed=5), build(7, seed=6)
  assert first == again
  assert first != other
  assert len(first) == 7
  for messages in first:
    assert messages[0]["role"] == "user"
    assert all(set(m) == {"role", "content"} and m["content"] for m in messages)


def test_code_edit_prompts_hold_a_stdlib_function_verbatim(code_edits, stdlib_text):
  for (message,) in code_edits:
    (source,) = _FENCE.findall(message["content"])
    assert source in stdlib_text
    (node,) = ast.parse(source).body
    assert isinstance(node, ast.FunctionDef)
    assert 10 <= len(source.splitlines()) <= 60 and len(source) <= 1500
    assert "Output only the complete new function" in message["content"]


def test_code_edit_instructions_name_what_is_in_the_function(code_edits):
  kinds = set()
  for (message,) in code_edits:
    text = message["content"]
    source = _FENCE.findall(text)[0]
    names = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
    names |= {n.arg for n in ast.walk(ast.parse(source)) if isinstance(n, ast.arg)}
    if m := re.search(r"renaming the (?:parameter|variable) `(\w+)` to `(\w+)`", text):
      assert m[1] in names and m[2] not in names
      kinds.add("rename")
    elif m := re.search(r"changing the integer constant `(-?\d+)` to `(-?\d+)`", text):
      assert re.search(rf"\b{m[1]}\b", source) and m[1] != m[2]
      kinds.add("constant")
    elif m := re.search(r"type hint `[^`]+` to the parameter `(\w+)`", text):
      assert m[1] in names
      kinds.add("hint")
    else:
      assert "docstring" in text
      kinds.add("docstring")
  assert len(kinds) >= 3  # the seed mixes the kinds of edit


def test_source_segment_matches_ast_get_source_segment():
  text = ("x = 'é'; y = 1\r\ndef f(a,\r\n      b):\r\n  return 'ü'  \x0c# form feed\n"
          "\nasync def g(): pass; z = [\n  1]\rclass C:\n  v = 2  # end\n")
  files = [p for p in workloads.stdlib_files() if p.stat().st_size < 20_000][:8]
  cases = [text] + [p.read_text(encoding="utf-8") for p in files]
  nodes = 0
  for case in cases:
    lines = io.StringIO(case, newline="").readlines()
    for node in ast.walk(ast.parse(case)):
      if isinstance(node, ast.stmt):
        assert workloads._source_segment(lines, node) == ast.get_source_segment(case, node)
        nodes += 1
  assert nodes > 300


def test_code_edit_refuses_more_than_the_limits_allow():
  with pytest.raises(ValueError, match="ask for fewer"):
    workloads.code_edit_requests(1, max_chars=0)


def test_agentic_requests_share_instructions_and_call_format(agentic):
  opening = agentic[0][:3]  # instruction + demonstration + the run's task
  assert len(opening[0]["content"]) > 500
  for k, messages in enumerate(agentic):
    assert messages[0] == opening[0] and messages[1] == opening[1]
    step = k % 4
    assert len(messages) == 3 + 2 * step  # the earlier calls and results of the run
    calls = [json.loads(m["content"]) for m in messages if m["role"] == "assistant"]
    assert all(set(c) == {"tool", "arguments"} for c in calls)
    if step:
      assert messages[:-2] == agentic[k - 1]  # the next step extends the previous one
  # Runs replay the same tools in the same order, on different functions.
  tools = [[json.loads(m["content"])["tool"] for m in r[1::2]] for r in agentic[3::4]]
  assert tools[0] == tools[1] == ["read_file", "search", "read_file", "rename_function"]
  assert agentic[0][2] != agentic[4][2]
  assert len({json.dumps(r) for r in agentic}) == len(agentic)


def test_chat_requests_are_distinct_until_they_run_out():
  questions = [r[0]["content"] for r in workloads.chat_requests(150)]
  assert len(set(questions)) == 150
  with pytest.raises(ValueError, match="150 distinct"):
    workloads.chat_requests(151)


def test_copy_rate_counts_positions_inside_copied_ngrams():
  output = list(range(10))
  assert workloads.copy_rate(output, [[99, *range(2, 10)]], n=4) == 0.8  # 2..9 copied
  assert workloads.copy_rate(output, [[0, 1, 2], [3, 4, 5]], n=4) == 0.0  # no spanning
  assert workloads.copy_rate(output, [output], n=8) == 1.0
  assert workloads.copy_rate([1, 2], [[1, 2]], n=8) == 0.0


def test_encoded_requests_fit_smollm2(smollm2_tokenizer, code_edits, agentic):
  tok, context = smollm2_tokenizer
  requests = code_edits + agentic + workloads.chat_requests(5)
  ids = workloads.encode_requests(tok, requests)
  header = tok.encode("<|im_start|>assistant\n")
  for row, messages in zip(ids, requests):
    assert 0 < len(row) <= context - 512  # room left to answer
    assert row[-len(header):] == header
    assert messages[-1]["content"] in tok.decode(row)
