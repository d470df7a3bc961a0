"""Policies: declarative rules over what the models said, evaluated per request.

A policy is a list of rules, written in YAML inside the ingress's ``user_config`` (``policies:``)::

    content-safety:
      description: Refuse images of weapons; flag knives for review.
      concepts: [weapon, knife]             # roll-ups the rules read as concepts["weapon"]
      rules:
        - id: weapons
          when: concepts["weapon"] > 0.3    # CEL, over the facts below
          action: block
          priority: 100
        - id: knives
          when: concepts["knife"] > 0.2
          action: flag

Conditions are `CEL <https://cel.dev>`_ expressions (``common-expression-language``, a Rust implementation):
no Python, no imports, no I/O, no loops. A rule's ``when`` reads these facts, all present on every route (empty
where a route has no such output, so a rule never meets a missing name):

==============  ===========================================================================================
``route``       the API route, e.g. ``/v1/multimodal/describe``
``classes``     the image's top ImageNet classes: ``[{"label", "probability", "synset"}]``, best first
``top_class``   the first of them (``{"label": "", "probability": 0.0, "synset": ""}`` without an image)
``concepts``    the policy's ``concepts``, each the probability that the image is one (0.0 without an image)
``labels``      zero-shot or fused label scores: ``{label: score}``
``top_label``   the best label: ``{"label", "score"}``
``text``        the text OCR read, line by line
``output``      the language model's answer
``input``       the caller's text (the multimodal ``text``, the chat's last user message)
==============  ===========================================================================================

Functions beyond CEL's standard ones: ``lowerAscii()``, ``upperAscii()``, ``trim()``; ``matches()`` takes
RE2 syntax (linear time).

Actions: ``flag`` (the answer carries the rule's id), ``annotate`` (its ``message``), ``route: <name>`` (where
the request should go next, e.g. a review queue: the highest-priority route wins), ``mask: <regex>`` (matches in
the answer's text are replaced by ``[masked]``) and ``block`` (the request is refused, 403, naming the rule).
Rules run from the highest ``priority`` down (ties in the order written); a ``block`` ends the evaluation.

Bounded run time: CEL has no loops, but comprehensions (``all``, ``exists``, ``exists_one``, ``map``,
``filter``) nested in each other multiply (three nested over 100 items took 16 s here), so a rule may not
nest them; and every rule is run at validation on the largest facts the API admits, in a separate process that
is killed at ``RULE_TIMEOUT_S``, and refused if it takes more than ``RULE_BUDGET_S`` of CPU. Both happen when the
policies are loaded, before a request sees them.
"""

import json
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import cel
import psutil
import regex
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from knowledge.graph import KnowledgeGraph, UnknownConcept, knowledge_graph

MAX_POLICIES = 16
MAX_RULES = 64
MAX_CONCEPTS = 32
MAX_EXPRESSION_CHARS = 1000
MAX_NESTING = 32  # brackets inside each other
MAX_COMPREHENSION_DEPTH = 1
RULE_BUDGET_S = 0.05  # CPU seconds for one rule on the largest facts; typical rules take well under a millisecond
RULE_TIMEOUT_S = 2.0  # CPU seconds: a rule still running after this much when timed is stopped (its process killed)
RULE_WALL_LIMIT_S = 60.0  # a rule that got too little CPU to finish in this long cannot be timed: refused
RULE_POLL_S = 0.2  # how often the timing process's CPU time is read while a rule runs
CHILD_START_S = 30.0  # to start the timing process and import the expression library
MASK_TIMEOUT_S = 0.05  # one mask pattern over one text
MASKED = "[masked]"
TRACE_CHARS = 200  # a string fact in a trace, at most
TRACE_ITEMS = 10  # a list fact in a trace, at most
COMPREHENSIONS = ("all", "exists", "exists_one", "map", "filter")
FACTS = ("route", "classes", "top_class", "concepts", "labels", "top_label", "text", "output", "input")

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"  # policy, rule and route names
NAME = re.compile(NAME_PATTERN)
MAX_MASK_CHARS = 200
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]


class RuleError(ValueError):
    """A rule that cannot be used; the message names it."""


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Name
    when: Annotated[str, StringConstraints(min_length=1, max_length=MAX_EXPRESSION_CHARS)] = Field(
        description="A CEL condition over the facts (see knowledge/rules.py)."
    )
    action: Any = Field(description="flag, block, annotate, {route: <name>} or {mask: <regex>}.")
    priority: int = Field(0, ge=-1000, le=1000, description="Higher runs first.")
    message: Annotated[str, StringConstraints(max_length=200)] | None = Field(
        None, description="What an `annotate` (or `flag`) says to the caller."
    )

    @property
    def kind(self) -> str:
        return self.action if isinstance(self.action, str) else next(iter(self.action))

    @field_validator("action")
    @classmethod
    def _one_action(cls, action: Any) -> Any:
        if action in ("flag", "block", "annotate"):
            return action
        if isinstance(action, dict) and len(action) == 1:
            ((kind, value),) = action.items()
            if kind == "route" and isinstance(value, str) and NAME.fullmatch(value):
                return action
            if kind == "mask" and isinstance(value, str) and 0 < len(value) <= MAX_MASK_CHARS:
                return action
        raise ValueError(
            "the action must be flag, block, annotate, {route: <name>} (1-64 lowercase letters, digits, '_', '.' "
            f"or '-') or {{mask: <regular expression of at most {MAX_MASK_CHARS} characters>}}"
        )


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    concepts: list[Annotated[str, StringConstraints(min_length=1, max_length=100)]] = Field(
        default_factory=list, max_length=MAX_CONCEPTS, description="Roll-ups the rules read as concepts[name]."
    )
    rules: list[Rule] = Field(min_length=1, max_length=MAX_RULES)

    @model_validator(mode="after")
    def _distinct(self) -> "Policy":
        ids = [rule.id for rule in self.rules]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"rule ids must be distinct; repeated: {', '.join(repeated)}")
        return self


@dataclass
class Facts:
    """What a request's models said, as the rules read it."""

    route: str = ""
    classes: list[dict] = field(default_factory=list)  # {"label", "probability", "synset"}
    concepts: dict[str, float] = field(default_factory=dict)
    labels: dict[str, float] = field(default_factory=dict)
    text: str = ""
    output: str = ""
    input: str = ""

    def variables(self) -> dict[str, Any]:
        top_class = self.classes[0] if self.classes else {"label": "", "probability": 0.0, "synset": ""}
        best = max(self.labels.items(), key=lambda pair: pair[1], default=("", 0.0))
        return {
            "route": self.route,
            "classes": self.classes,
            "top_class": top_class,
            "concepts": self.concepts,
            "labels": self.labels,
            "top_label": {"label": best[0], "score": best[1]},
            "text": self.text,
            "output": self.output,
            "input": self.input,
        }


@dataclass
class Fired:
    rule: str
    action: str  # flag, block, annotate, route, mask
    priority: int
    facts: dict[str, Any]  # the facts its condition reads, as they were (long values cut)
    route: str | None = None
    message: str | None = None


@dataclass
class Decision:
    policy: str
    blocked_by: str | None = None
    route: str | None = None
    flags: list[str] = field(default_factory=list)
    annotations: list[dict] = field(default_factory=list)
    fired: list[Fired] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # rules that could not be evaluated: {"rule", "error"}
    evaluated: int = 0
    seconds: float = 0.0
    masks: list[tuple[str, Any]] = field(default_factory=list)  # (rule id, compiled pattern)

    @property
    def outcome(self) -> str:
        return "block" if self.blocked_by else "allow"

    def mask(self, text: str) -> tuple[str, int]:
        """``text`` with every mask rule's matches replaced; the number replaced."""
        total = 0
        for _, pattern in self.masks:
            try:
                text, count = pattern.subn(MASKED, text, timeout=MASK_TIMEOUT_S)
            except TimeoutError:  # a pattern that backtracks on this text: masked whole rather than leaked
                text, count = MASKED, 1
            total += count
        return text, total


@dataclass
class CompiledRule:
    rule: Rule
    program: Any  # cel.Program
    reads: tuple[str, ...]  # the facts it reads
    pattern: Any = None  # the mask's compiled regex


class CompiledPolicy:
    def __init__(self, name: str, policy: Policy, graph: KnowledgeGraph):
        self.name = name
        self.policy = policy
        self.concepts: dict[str, str] = {}  # concept as written -> synset id
        for index, concept in enumerate(policy.concepts):
            try:
                self.concepts[concept] = graph.resolve(concept).id
            except UnknownConcept as exc:
                raise RuleError(f"policy {name!r}: concepts[{index}] is {exc}") from None
        order = sorted(enumerate(policy.rules), key=lambda pair: (-pair[1].priority, pair[0]))
        self.rules = [_compile(name, rule) for _, rule in order]

    def evaluate(self, facts: Facts) -> Decision:
        start = time.perf_counter()
        decision = Decision(self.name)
        variables = facts.variables()
        context = _context(variables)
        for compiled in self.rules:
            rule = compiled.rule
            decision.evaluated += 1
            try:
                fired = compiled.program.execute(context)
            except Exception as exc:  # noqa: BLE001 - a missing key or a type error: the rule did not fire
                decision.errors.append({"rule": rule.id, "error": _error_message(exc)})
                continue
            if fired is not True:
                if not isinstance(fired, bool):
                    decision.errors.append({"rule": rule.id, "error": "the condition is not a boolean"})
                continue
            kind = rule.kind
            route = rule.action["route"] if kind == "route" else None
            seen = {name: _traced(variables[name]) for name in compiled.reads}
            decision.fired.append(Fired(rule.id, kind, rule.priority, seen, route, rule.message))
            if kind == "block":
                decision.blocked_by = rule.id
                break
            if kind == "flag":
                decision.flags.append(rule.id)
            elif kind == "annotate":
                decision.annotations.append({"rule": rule.id, "message": rule.message or rule.id})
            elif kind == "route" and decision.route is None:
                decision.route = route
            elif kind == "mask":
                decision.masks.append((rule.id, compiled.pattern))
        if decision.masks:  # what is masked in the answer is masked in the trace too
            for fired in decision.fired:
                fired.facts = _masked_facts(fired.facts, decision)
        decision.seconds = time.perf_counter() - start
        return decision


def parse_policies(raw: Any) -> dict[str, Policy]:
    """The ``policies`` of a config, validated; a problem raises ``RuleError`` naming the policy and the rule
    (by its id where it has one) and what is wrong."""
    if not isinstance(raw, dict):
        raise RuleError("policies must be a mapping of policy names to policies")
    if len(raw) > MAX_POLICIES:
        raise RuleError(f"at most {MAX_POLICIES} policies")
    parsed = {}
    for name, data in raw.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise RuleError("policy names are 1-64 lowercase letters, digits, '_', '.' or '-'")
        try:
            parsed[name] = Policy.model_validate(data)
        except ValidationError as exc:
            raise RuleError(f"policy {name!r}: " + "; ".join(_located(error, data) for error in exc.errors())) from None
    return parsed


def _located(error: dict, data: Any) -> str:
    """A validation error, with the rule it is in named by its id."""
    loc = list(error["loc"])
    where = ".".join(str(part) for part in loc)
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        rules = data.get("rules") if isinstance(data, dict) else None
        rule = rules[loc[1]] if isinstance(rules, list) and loc[1] < len(rules) else None
        rule_id = rule.get("id") if isinstance(rule, dict) else None
        field_name = ".".join(str(part) for part in loc[2:]) or "rule"
        where = f"rule {rule_id!r} ({field_name})" if isinstance(rule_id, str) else f"rules[{loc[1]}] ({field_name})"
    return f"{where}: {error['msg']}"


def compile_policies(
    policies: dict[str, Policy], graph: KnowledgeGraph | None = None, time_rules: bool = True
) -> dict[str, CompiledPolicy]:
    """Every policy checked and compiled; the first problem raises ``RuleError`` naming its policy and rule.

    With ``time_rules``, every rule is also run on the largest facts the API admits, in a child process that
    is killed if a rule runs past ``RULE_TIMEOUT_S`` of CPU time (the expression library holds the GIL while it
    evaluates, so a thread could not be stopped, and would stall the caller meanwhile): about a second, once
    per change. CPU time, not wall time: a replica that starts on a busy node, where the child waits for a
    core, must not refuse an ordinary rule for the wait.
    """
    graph = graph or knowledge_graph()
    if len(policies) > MAX_POLICIES:
        raise RuleError(f"at most {MAX_POLICIES} policies")
    compiled = {name: CompiledPolicy(name, policy, graph) for name, policy in policies.items()}
    if time_rules and compiled:
        _time_in_child({name: policy.model_dump() for name, policy in policies.items()})
    return compiled


def _time_in_child(policies: dict[str, dict], command: tuple[str, ...] = (sys.executable, "-m", "knowledge.rules")):
    """Run ``python -m knowledge.rules`` (``command``) on the policies and read its progress: a rule that has
    used ``RULE_TIMEOUT_S`` of CPU time without finishing is refused and the process killed."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen(
        list(command),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
    )  # fmt: skip
    try:
        process = psutil.Process(child.pid)
        child.stdin.write(json.dumps(policies))
        child.stdin.close()
        current, cpu_at_start, started_at = None, 0.0, 0.0  # the rule running, when it started
        while True:
            ready, _, _ = select.select([child.stdout], [], [], RULE_POLL_S if current is not None else CHILD_START_S)
            if not ready:
                if current is None:
                    raise RuleError("the rules could not be timed: the checking process did not start")
                (policy, rule), used = current, _cpu_seconds(process) - cpu_at_start
                if used > RULE_TIMEOUT_S:
                    raise RuleError(
                        f"policy {policy!r}: rule {rule!r}: did not finish within {RULE_TIMEOUT_S} s of CPU time on "
                        "the largest facts the API admits; stopped"
                    )
                if time.monotonic() - started_at > RULE_WALL_LIMIT_S:
                    raise RuleError(
                        f"policy {policy!r}: rule {rule!r} could not be timed: it got {used:.1f} s of CPU time in "
                        f"{RULE_WALL_LIMIT_S:.0f} s (the node is too busy); retry"
                    )
                continue
            line = child.stdout.readline()
            if not line:
                raise RuleError("the rules could not be timed: the checking process ended early")
            message = json.loads(line)
            if message[0] == "start":
                current, cpu_at_start, started_at = message[1:], _cpu_seconds(process), time.monotonic()
            elif message[0] == "took" and message[1] > RULE_BUDGET_S:
                policy, rule = current
                raise RuleError(
                    f"policy {policy!r}: rule {rule!r}: takes {message[1]:.2f} s on the largest facts the API "
                    f"admits, over the {RULE_BUDGET_S} s a rule may take"
                )
            elif message[0] == "done":
                return
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()


def _cpu_seconds(process: psutil.Process) -> float:
    """CPU time the process has used (user and system); 0 once it is gone (what it wrote is still to be read)."""
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


def _time_rules(policies: dict[str, dict], out) -> None:
    """In the child: each rule on the largest facts and on empty ones, the slower time reported."""

    def send(*message) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    for name, data in policies.items():
        compiled = CompiledPolicy(name, Policy.model_validate(data), knowledge_graph())
        contexts = [_context(largest_facts(compiled.concepts).variables()), _context(Facts().variables())]
        for rule in compiled.rules:
            send("start", name, rule.rule.id)
            slowest = 0.0
            for context in contexts:
                # CPU time, not wall time: a replica starting on a busy node must not refuse a rule for the wait.
                start = time.thread_time()
                try:
                    rule.program.execute(context)
                except Exception:  # noqa: BLE001, S110 - errors on made-up facts show in live decisions
                    pass
                slowest = max(slowest, time.thread_time() - start)
            send("took", slowest)
    send("done")


def _compile(policy: str, rule: Rule) -> CompiledRule:
    where = f"policy {policy!r}: rule {rule.id!r}"
    depth, brackets = _nesting(rule.when)
    if brackets > MAX_NESTING:
        raise RuleError(f"{where}: brackets nest {brackets} deep; at most {MAX_NESTING}")
    if depth > MAX_COMPREHENSION_DEPTH:
        raise RuleError(
            f"{where}: comprehensions (all, exists, exists_one, map, filter) nest {depth} deep; at most "
            f"{MAX_COMPREHENSION_DEPTH}, so that a rule's run time stays linear in the facts"
        )
    try:
        program = cel.compile(rule.when)
    except Exception as exc:  # noqa: BLE001 - the library raises ValueError with the parser's message
        raise RuleError(f"{where}: the condition does not parse: {_error_message(exc)}") from None
    names = set(program.variables())
    unknown = sorted(names - set(FACTS) - _bound_names(rule.when))
    if unknown:
        raise RuleError(f"{where}: unknown names {', '.join(unknown)}; the facts are {', '.join(FACTS)}")
    pattern = None
    if rule.kind == "mask":
        try:
            pattern = regex.compile(rule.action["mask"])
        except regex.error as exc:
            raise RuleError(f"{where}: the mask is not a valid regular expression: {exc}") from None
    if rule.kind == "annotate" and not rule.message:
        raise RuleError(f"{where}: an annotate rule needs a message")
    reads = tuple(name for name in FACTS if name in names)
    return CompiledRule(rule, program, reads, pattern)


# --- the expression language's sandbox ---------------------------------------------------------------

_STRINGS = re.compile(r"""(?:[rRbB]{0,2})(?:'''.*?'''|\"\"\".*?\"\"\"|'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*")""", re.S)
_COMPREHENSION = re.compile(r"\.\s*(" + "|".join(COMPREHENSIONS) + r")\s*\(")
_BOUND = re.compile(r"\.\s*(?:" + "|".join(COMPREHENSIONS) + r")\s*\(\s*([A-Za-z_]\w*)\s*,")


def _nesting(expression: str) -> tuple[int, int]:
    """How deeply comprehension macros nest in ``expression``, and how deeply brackets do (strings ignored)."""
    code = _STRINGS.sub('""', expression)
    comprehension_at = {m.end() - 1 for m in _COMPREHENSION.finditer(code)}
    opened: list[bool] = []  # per open bracket: is it a comprehension's
    depth = deepest = brackets = 0
    for index, char in enumerate(code):
        if char in "([{":
            opened.append(index in comprehension_at)
            depth += opened[-1]
            deepest, brackets = max(deepest, depth), max(brackets, len(opened))
        elif char in ")]}" and opened:
            depth -= opened.pop()
    return deepest, brackets


def _bound_names(expression: str) -> set[str]:
    """The variables comprehensions bind (``l`` in ``classes.exists(l, ...)``): not facts."""
    return set(_BOUND.findall(_STRINGS.sub('""', expression)))


_LOWER = {ord(c): ord(c) + 32 for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}
_UPPER = {v: k for k, v in _LOWER.items()}


def _context(variables: dict[str, Any]) -> "cel.Context":
    context = cel.Context()
    context.add_function("lowerAscii", lambda s: s.translate(_LOWER))
    context.add_function("upperAscii", lambda s: s.translate(_UPPER))
    context.add_function("trim", lambda s: s.strip())
    context.update(variables)
    return context


def _error_message(exc: Exception) -> str:
    message = str(exc).split("\n")[0][:300]
    if isinstance(exc, KeyError):
        return f"no key {message} in the facts"
    return message


def _masked_facts(value: Any, decision: Decision) -> Any:
    if isinstance(value, str):
        return decision.mask(value)[0]
    if isinstance(value, list):
        return [_masked_facts(item, decision) for item in value]
    if isinstance(value, dict):
        return {key: _masked_facts(item, decision) for key, item in value.items()}
    return value


def _traced(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= TRACE_CHARS else value[:TRACE_CHARS] + "…"
    if isinstance(value, list):
        return [_traced(item) for item in value[:TRACE_ITEMS]]
    if isinstance(value, dict):
        return {key: _traced(item) for key, item in list(value.items())[: TRACE_ITEMS * 4]}
    return value


def largest_facts(concepts: dict[str, str]) -> Facts:
    """The largest facts a request can produce (the API's limits), to time rules on."""
    from deployments.settings import limits

    lim = limits()
    line = "W" * 60
    ocr_lines = 200 * lim.max_chat_images
    return Facts(
        route="/v1/chat/completions",
        classes=[{"label": "x" * 40, "probability": 0.01, "synset": "n00000000"}] * (5 * lim.max_chat_images),
        concepts={name: 0.5 for name in concepts},
        labels={f"{i:03d}" + "l" * (lim.max_label_chars - 3): 1 / lim.max_labels for i in range(lim.max_labels)},
        text="\n".join([line] * ocr_lines),
        output="w " * 4096,
        input="i" * lim.max_text_chars,
    )


if __name__ == "__main__":
    _time_rules(json.loads(sys.stdin.read()), sys.stdout)
