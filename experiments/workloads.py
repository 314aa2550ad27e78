"""Real text for benchmarks, available offline on every machine.

The Python standard library's own source files are a long, natural corpus of code and
English comments that every machine running specjax already has. Two kinds of
workload are built from them:

* ``stdlib_prompts``: long raw token sequences (prefill and long-context decoding).
* chat requests (lists of messages for ``Tokenizer.apply_chat_template``) that span the
  range SuffixDecoding cares about, from copy-heavy to not at all (see
  shared/research/suffix_decoding.md, section 8):

  - ``code_edit_requests``: rewrite a real stdlib function with one small change; the
    answer mostly copies the prompt (the BlazEdit / SWE-agent regime).
  - ``agentic_requests``: the replayed steps of tool-using agent runs, one fixed
    instruction and JSON tool-call format; outputs repeat across requests (the
    AgenticSQL regime, where an index over previous outputs pays).
  - ``chat_requests``: open questions, the negative control.

``copy_rate`` measures how copy-heavy an output really was.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import itertools
import json
import pathlib
import random
import sysconfig
from typing import Iterator, Sequence

Message = dict[str, str]  # {"role": "user", "content": ...}
Request = list[Message]  # one conversation, rendered by apply_chat_template


def stdlib_files() -> list[pathlib.Path]:
  """The standard library's top-level .py files, sorted by name (deterministic)."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  return sorted(p for p in root.glob("*.py") if p.is_file())


def stdlib_prompts(tokenizer, num_rows: int, length: int) -> list[list[int]]:
  """``num_rows`` different token sequences of exactly ``length`` tokens each.

  Row r starts at file r * 7 (mod the file count) and reads on through the following
  files until it has ``length`` tokens, so rows differ from their first token.
  """
  files = stdlib_files()
  if not files:
    raise RuntimeError("no standard-library .py files found; cannot build the workload.")
  rows = []
  for r in range(num_rows):
    ids: list[int] = []
    i = (r * 7) % len(files)
    while len(ids) < length:
      text = files[i % len(files)].read_text(encoding="utf-8", errors="replace")
      ids.extend(tokenizer.encode(text))
      i += 1
    rows.append(ids[:length])
  return rows


# ---------------------------------------------------------------------------------------
# Functions of the standard library.


@dataclasses.dataclass(frozen=True)
class _StdlibFunction:
  """A top-level function of a standard-library file, with its exact source."""

  file: pathlib.Path
  name: str
  first_line: int  # 1-based, of the `def` line
  last_line: int
  source: str  # as ast.get_source_segment: the `def` line to the last body line
  node: ast.FunctionDef = dataclasses.field(compare=False, repr=False)

  @property
  def path(self) -> str:
    """The file as a CPython checkout names it, e.g. "Lib/shutil.py"."""
    return f"Lib/{self.file.name}"


def _source_segment(lines: list[str], node: ast.stmt) -> str:
  """ast.get_source_segment(text, node) for ``lines`` = the text's lines, ends kept."""
  first, last = node.lineno - 1, node.end_lineno - 1
  if first == last:
    return lines[first].encode()[node.col_offset:node.end_col_offset].decode()
  head = lines[first].encode()[node.col_offset:].decode()  # offsets count UTF-8 bytes
  tail = lines[last].encode()[:node.end_col_offset].decode()
  return "".join([head, *lines[first + 1:last], tail])


def _stdlib_functions(rng: random.Random, *, min_lines: int, max_lines: int,
                      max_chars: int, per_file: int) -> Iterator[_StdlibFunction]:
  """Undecorated top-level functions, files in a random order, ``per_file`` from each.

  Files are parsed lazily, so a small request costs a few files, not the whole stdlib.
  """
  files = stdlib_files()
  for file in rng.sample(files, len(files)):
    try:
      text = file.read_text(encoding="utf-8")
      tree = ast.parse(text)
    except (UnicodeDecodeError, SyntaxError):
      continue
    # ast.get_source_segment re-splits the whole file in Python on every call (seconds
    # per large file); split once, on the line breaks the parser counts (not \f, \v).
    lines = io.StringIO(text, newline="").readlines()
    found = []
    for node in tree.body:
      if (not isinstance(node, ast.FunctionDef) or node.decorator_list  # not in the segment
          or not min_lines <= node.end_lineno - node.lineno + 1 <= max_lines):
        continue
      source = _source_segment(lines, node)
      # Backticks or tabs would break the ```python fence or the "copy it" premise.
      if len(source) > max_chars or "```" in source or "\t" in source:
        continue
      found.append(_StdlibFunction(file, node.name, node.lineno, node.end_lineno, source,
                                   node))
    rng.shuffle(found)
    yield from found[:per_file]


def _take(items: Iterator, n: int, what: str):
  taken = list(itertools.islice(items, n))
  if len(taken) < n:
    raise ValueError(f"asked for {n} {what} but the standard library only yields "
                     f"{len(taken)} with these limits; ask for fewer or relax them.")
  return taken


# ---------------------------------------------------------------------------------------
# Code editing: the answer is the prompt's function with one small change.

_RENAME_SUFFIXES = ("_value", "_item", "_obj", "_arg")
_DOC_LINES = ("This function is part of the `{}` module.",
              "See the `{}` module documentation for details.")


def _parameters(fn: ast.FunctionDef) -> list[tuple[ast.arg, ast.expr | None]]:
  """(parameter, default or None) for every named parameter except self and cls."""
  a = fn.args
  positional = a.posonlyargs + a.args
  defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
  pairs = list(zip(positional, defaults)) + list(zip(a.kwonlyargs, a.kw_defaults))
  return [(p, d) for p, d in pairs if p.arg not in ("self", "cls")]


def _type_hint(default: ast.expr | None) -> str:
  if isinstance(default, ast.Constant):
    if default.value is None:
      return "object | None"
    if isinstance(default.value, (bool, int, float, str, bytes)):
      return type(default.value).__name__
  return "object"


def _edit_instructions(fn: _StdlibFunction, rng: random.Random) -> list[str]:
  """Every small edit that applies to ``fn``, as the clause of an instruction."""
  node = fn.node
  params = _parameters(node)
  names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
  names |= {a.arg for n in ast.walk(node) if isinstance(n, ast.arguments)
            for a in n.posonlyargs + n.args + n.kwonlyargs}
  assigned = sorted({n.id for n in ast.walk(node)
                     if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
                    - {p.arg for p, _ in params})
  edits = []
  variables = [("parameter", p.arg) for p, _ in params] + [("variable", v) for v in assigned]
  if variables:
    kind, old = rng.choice(variables)
    new = old + rng.choice(_RENAME_SUFFIXES)
    if new not in names:
      edits.append(f"renaming the {kind} `{old}` to `{new}` everywhere it appears")
  line = rng.choice(_DOC_LINES).format(fn.file.stem)
  if ast.get_docstring(node) is not None:
    edits.append(f"adding the sentence \"{line}\" as a new last line of its docstring")
  else:
    edits.append(f"adding the one-line docstring \"\"\"{line}\"\"\" right after the "
                 "`def` line")
  ints = sorted({n.value for n in ast.walk(node) if isinstance(n, ast.Constant)
                 and type(n.value) is int})  # pylint: disable=unidiomatic-typecheck
  if ints:
    old = rng.choice(ints)
    new = old + 1 if old + 1 not in ints else max(ints) + 1
    edits.append(f"changing the integer constant `{old}` to `{new}` everywhere it appears")
  unannotated = [(p, d) for p, d in params if p.annotation is None]
  if unannotated:
    p, default = rng.choice(unannotated)
    edits.append(f"adding the type hint `{_type_hint(default)}` to the parameter "
                 f"`{p.arg}`")
  return edits


def code_edit_requests(n: int, seed: int = 0, max_chars: int = 2000) -> list[Request]:
  """``n`` requests to rewrite a standard-library function with one small change.

  Each prompt holds the function's exact source (10 to 60 lines, at most two functions
  per file) and one edit: rename a parameter or local variable, add a docstring line,
  change an integer constant, or type-hint one parameter. The whole function must be
  written back, so a faithful answer is almost all copied from the prompt.

  Args:
    n: number of requests.
    seed: selects the functions and the edits.
    max_chars: longest function source to use (2000 chars is about 600 SmolLM2
      tokens).

  Returns:
    ``n`` single-message conversations.

  Raises:
    ValueError: fewer than ``n`` functions fit the limits.
  """
  rng = random.Random(seed)
  functions = _take(_stdlib_functions(rng, min_lines=10, max_lines=60,
                                      max_chars=max_chars, per_file=2),
                    n, "code-edit functions")
  requests = []
  for fn in functions:
    edit = rng.choice(_edit_instructions(fn, rng))
    # Code first, then the instruction: greedy SmolLM2-135M copied 77% of 128 output
    # tokens (8-grams of the prompt) this way, 47% with the instruction first.
    content = (f"```python\n{fn.source}\n```\n\nCopy the Python function above line by "
               f"line with one change: {edit}. Keep every other line exactly as it is. "
               "Output only the complete new function in a ```python block.")
    requests.append([{"role": "user", "content": content}])
  return requests


# ---------------------------------------------------------------------------------------
# Agentic: replayed tool-using runs, one instruction and one JSON call format.

_AGENT_INSTRUCTIONS = """\
You are a tool-using coding agent working in a checkout of the CPython source tree. \
You can call these tools:
- search(pattern: str, path: str): list the lines of files under `path` that contain \
`pattern`.
- read_file(path: str, start_line: int, end_line: int): show lines of a file.
- rename_function(path: str, name: str, new_name: str): rename a top-level function \
and every call of it in the file.
- run_tests(module: str, test_name: str): run one test of the standard-library test \
suite.
Respond with exactly one tool call, a JSON object of the form \
{"tool": "<tool name>", "arguments": {...}}, and nothing else."""

# One finished exchange opens every run: without it SmolLM2-135M answers the first
# step in prose or Python rather than JSON (measured; later steps follow their history).
_AGENT_DEMO_TASK = "Task: show lines 1 to 3 of `Lib/json/__init__.py`."
_AGENT_DEMO_CALL = {"tool": "read_file", "arguments": {"path": "Lib/json/__init__.py",
                                                       "start_line": 1, "end_line": 3}}
_AGENT_DEMO_RESULT = """\
1: r\"\"\"JSON (JavaScript Object Notation) <https://json.org> is a subset of
2: JavaScript syntax (ECMA-262 3rd edition) used as a lightweight data
3: interchange format."""

_NEW_NAME_PREFIXES = ("legacy_", "old_", "internal_", "compat_")


def _agent_steps(fn: _StdlibFunction, new_name: str) -> list[tuple[dict, str]]:
  """The four (tool call, result) steps of renaming ``fn`` and running its test."""
  lines = fn.source.splitlines()
  numbered = "\n".join(f"{fn.first_line + i}: {line}" for i, line in enumerate(lines))
  calls = fn.file.read_text(encoding="utf-8").count(f"{fn.name}(") - 1  # minus the def
  test_module = "test.test_" + fn.file.stem.lstrip("_")
  return [
      ({"tool": "search", "arguments": {"pattern": f"def {fn.name}(", "path": fn.path}},
       f"{fn.path}:{fn.first_line}: {lines[0]}"),
      ({"tool": "read_file", "arguments": {"path": fn.path, "start_line": fn.first_line,
                                           "end_line": fn.last_line}},
       numbered),
      ({"tool": "rename_function", "arguments": {"path": fn.path, "name": fn.name,
                                                 "new_name": new_name}},
       f"Renamed 1 definition and {calls} call(s) in {fn.path}."),
      ({"tool": "run_tests", "arguments": {"module": test_module,
                                           "test_name": f"test_{new_name}"}},
       "Ran 1 test: OK."),
  ]


def agentic_requests(n: int, seed: int = 0) -> list[Request]:
  """``n`` successive steps of tool-using agent runs, four steps per run.

  Each run renames one standard-library function and runs its test: search for the
  definition, read it, rename it, test it. Step k's conversation is a fixed
  instruction with one demonstration exchange, the run's task, then the k earlier
  calls as assistant turns with their results (the `def` line, the numbered source,
  ...) as user turns; the expected answer is the next JSON call. So answers share
  their structure with the same step of earlier runs, and copy paths, names and line
  numbers from their own prompt.

  Args:
    n: number of requests (the last run may be cut short).
    seed: selects the functions and their new names.

  Returns:
    ``n`` conversations in run order, step 1 of a run before step 2.

  Raises:
    ValueError: the standard library yields too few functions.
  """
  rng = random.Random(seed)
  steps_per_run = 4
  functions = _take(_stdlib_functions(rng, min_lines=3, max_lines=40, max_chars=1500,
                                      per_file=1),
                    -(-n // steps_per_run), "agent-run functions")
  requests = []
  for fn in functions:
    new_name = rng.choice(_NEW_NAME_PREFIXES) + fn.name.lstrip("_")
    task = (f"Task: rename the function `{fn.name}` in `{fn.path}` to `{new_name}`, then "
            "run its test.")
    # As in real agent loops, calls are the assistant's own turns and their results
    # come back as user turns.
    messages = [
        {"role": "user", "content": f"{_AGENT_INSTRUCTIONS}\n\n{_AGENT_DEMO_TASK}"},
        {"role": "assistant", "content": json.dumps(_AGENT_DEMO_CALL)},
        {"role": "user", "content": f"Result:\n{_AGENT_DEMO_RESULT}\n\nNew {task}"},
    ]
    for call, result in _agent_steps(fn, new_name):
      requests.append(list(messages))
      messages += [{"role": "assistant", "content": json.dumps(call)},
                   {"role": "user", "content": f"Result:\n{result}\n\nNext tool call:"}]
  return requests[:n]


# ---------------------------------------------------------------------------------------
# Open chat: the control, where outputs copy little from anything.

_CHAT_TEMPLATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Why is {} important for the environment?", ("recycling", "biodiversity", "clean water")),
    ("Give me three tips for learning {}.", ("the piano", "Spanish", "to swim")),
    ("What are the main causes of {}?", ("inflation", "earthquakes", "climate change")),
    ("Write a short poem about {}.", ("autumn leaves", "the ocean", "a lighthouse")),
    ("Explain {} to a ten-year-old.", ("gravity", "photosynthesis", "electricity")),
    ("What is the difference between {}?", ("weather and climate", "a virus and a bacterium",
                                            "a lake and a pond")),
    ("How do I make {}?", ("pancakes", "a paper airplane", "a cup of green tea")),
    ("What should I pack for {}?", ("a beach holiday", "a hiking trip", "a business trip")),
    ("Who was {} and why is he remembered?", ("Isaac Newton", "Leonardo da Vinci",
                                              "Nelson Mandela")),
    ("Who was {} and why is she remembered?", ("Marie Curie", "Ada Lovelace",
                                               "Rosa Parks")),
    ("Describe a typical day in the life of {}.", ("a nurse", "a farmer", "an astronaut")),
    ("What are the benefits of {}?", ("regular exercise", "reading every day",
                                      "a good night's sleep")),
    ("Suggest a name for {}.", ("a bakery", "a pet turtle", "a cycling club")),
    ("How does {} work?", ("a refrigerator", "a rainbow", "the human heart")),
    ("Write a friendly email inviting a colleague to {}.", ("lunch", "a team meeting",
                                                            "a book club")),
    ("What is the capital of {} and what is it known for?", ("Japan", "Canada", "Kenya")),
    ("Tell me a fun fact about {}.", ("octopuses", "the Moon", "honey bees")),
    ("How can I stay motivated when {}?", ("working from home", "studying for exams",
                                           "training for a marathon")),
    ("What are some good habits for {}?", ("saving money", "staying healthy",
                                           "keeping a tidy home")),
    ("Why do {}?", ("cats purr", "leaves change colour in autumn", "we dream")),
    ("Write a short story that begins with: \"{}\"", ("The door was already open.",
                                                      "It had rained for forty days.",
                                                      "Nobody noticed the new moon.")),
    ("What are the pros and cons of {}?", ("electric cars", "living in a big city",
                                           "working a four-day week")),
    ("How would you describe the taste of {} to someone who has never tried it?",
     ("mango", "coffee", "dark chocolate")),
    ("What happened during {}?", ("the French Revolution", "the Apollo 11 mission",
                                  "the fall of the Berlin Wall")),
    ("Recommend some activities for {}.", ("a rainy weekend", "a child's birthday party",
                                           "a family reunion")),
    ("How do {} survive the winter?", ("bears", "trees", "birds")),
    ("What makes {} a good friend?", ("someone", "a dog", "a neighbour")),
    ("Give me advice on {}.", ("starting a vegetable garden", "preparing for a job "
                               "interview", "learning to cook")),
    ("What is {} and how is it measured?", ("temperature", "air pressure", "humidity")),
    ("Compose a haiku about {}.", ("snow", "a quiet morning", "city lights")),
    ("Why is {} called that?", ("the Pacific Ocean", "the Milky Way", "a hamburger")),
    ("What are the rules of {}?", ("chess", "basketball", "tennis")),
    ("How can a small town attract more {}?", ("tourists", "young families",
                                              "new businesses")),
    ("What would happen if {}?", ("the Moon disappeared", "everyone spoke the same "
                                  "language", "it never got dark")),
    ("Summarize the plot of {} in a few sentences.", ("Romeo and Juliet",
                                                     "Cinderella", "Robinson Crusoe")),
    ("What is the best way to learn about {}?", ("astronomy", "world history",
                                                 "classical music")),
    ("Describe {} using all five senses.", ("a forest after rain", "a busy market",
                                            "a winter evening")),
    ("What jobs might exist in {}?", ("a city on Mars", "the year 2100",
                                      "an underwater town")),
    ("How do people celebrate {}?", ("the New Year", "a wedding", "a harvest")),
    ("Is it better to {}? Explain your opinion.", ("read books or watch films",
                                                   "travel alone or with friends",
                                                   "live by the sea or in the mountains")),
    ("What are some common mistakes people make when {}?", ("learning to drive",
                                                            "giving a speech",
                                                            "painting a room")),
    ("Write a thank-you note to {}.", ("a teacher", "a neighbour who helped me move",
                                       "a doctor")),
    ("How does {} affect our daily lives?", ("the weather", "the internet",
                                             "music")),
    ("What animals live in {}?", ("the Arctic", "a rainforest", "the desert")),
    ("Explain why {}.", ("the sky is blue", "ice floats on water", "bread rises")),
    ("Plan a simple three-course dinner for {}.", ("a vegetarian guest", "two people",
                                                   "a summer evening")),
    ("What questions should I ask before {}?", ("adopting a dog", "renting a flat",
                                                "buying a used bike")),
    ("Describe the personality of {}.", ("a wise old owl in a fable", "a curious robot",
                                         "a grumpy dragon")),
    ("How did people {} before modern technology?", ("keep food cold", "tell the time",
                                                     "send messages")),
    ("What is a good hobby for someone who likes {}?", ("being outdoors", "puzzles",
                                                        "meeting people")),
)


def chat_requests(n: int, seed: int = 0) -> list[Request]:
  """``n`` distinct open questions (50 templates x 3 fillers), the copy-free control.

  Args:
    n: number of requests, at most 150.
    seed: the order (and so the choice) of questions.

  Returns:
    ``n`` single-message conversations, all different.

  Raises:
    ValueError: ``n`` exceeds the 150 distinct questions.
  """
  questions = [template.format(slot) for template, slots in _CHAT_TEMPLATES
               for slot in slots]
  if n > len(questions):
    raise ValueError(f"chat_requests has {len(questions)} distinct questions; asked for "
                     f"{n}. Ask for fewer or add templates.")
  rng = random.Random(seed)
  return [[{"role": "user", "content": q}] for q in rng.sample(questions, n)]


# ---------------------------------------------------------------------------------------
# Tokens.


def encode_requests(tokenizer, requests: Sequence[Request]) -> list[list[int]]:
  """Token ids of each conversation, ending with the header of the assistant's turn.

  Args:
    tokenizer: a ``specjax.tokenizer.Tokenizer`` with a chat template (e.g.
      ``specjax.load_model("smollm2-135m").tokenizer``).
    requests: conversations, e.g. from ``code_edit_requests``.

  Returns:
    One id list per request, ready for ``specjax.generate``.
  """
  return [tokenizer.apply_chat_template(messages, add_generation_prompt=True)
          for messages in requests]


def copy_rate(output: Sequence[int], references: Sequence[Sequence[int]],
              n: int = 8) -> float:
  """Fraction of ``output`` covered by n-grams that also occur in some reference.

  A position counts when any window of ``n`` consecutive output tokens containing it
  appears verbatim in a reference (n-grams do not span two references). This is the
  share of the output that a suffix index over the references could have drafted,
  given long enough matches.

  Args:
    output: generated token ids.
    references: token sequences to copy from (the prompt, or earlier outputs).
    n: shortest span that counts as a copy.

  Returns:
    A value in [0, 1]; 0 for an output shorter than ``n``.
  """
  grams = {tuple(ref[i:i + n]) for ref in references for i in range(len(ref) - n + 1)}
  covered = [False] * len(output)
  for i in range(len(output) - n + 1):
    if tuple(output[i:i + n]) in grams:
      covered[i:i + n] = [True] * n
  return sum(covered) / len(output) if output else 0.0
