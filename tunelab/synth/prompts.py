"""The prompts the strategies send to the teacher, after the papers that introduced them.

Self-Instruct (Wang et al., 2023): a few tasks from the pool as numbered examples, the teacher
writes the next one. Evol-Instruct (Xu et al., 2024, WizardLM): the teacher rewrites a prompt
with one in-depth operation (add a constraint, deepen, concretize, more reasoning steps), or
writes a new prompt of the same domain (in-breadth); the words "given prompt" / "rewritten
prompt" must not leak into the result. Distilling step-by-step (Hsieh et al., 2023): the teacher
reasons step by step, then gives the answer after a marker, so rationale and answer are
separable.
"""

from __future__ import annotations

SELF_INSTRUCT = (
    "Come up with a new task for an assistant. It must differ from the examples below, be answerable in "
    "text, and be one sentence or a short paragraph.\n\n{examples}\nTask {next}:"
)

_REWRITER = (
    "I want you to act as a Prompt Rewriter. Rewrite the given prompt into a more complex version that a "
    "capable AI assistant would find a bit harder to handle, while a human could still understand and answer "
    "it. Keep any input, table or code of the given prompt. {method} The rewritten prompt may add at most "
    "10 to 20 words. The words 'given prompt' and 'rewritten prompt' must not appear in it.\n\n"
    "#Given Prompt#:\n{instruction}\n\n#Rewritten Prompt#:"
)

IN_DEPTH = {
    "add_constraints": _REWRITER.replace("{method}", "Add one more constraint or requirement to it."),
    "deepen": _REWRITER.replace("{method}", "If it asks about a particular issue, increase the depth and breadth of the inquiry."),
    "concretize": _REWRITER.replace("{method}", "Replace general concepts with more specific ones."),
    "increase_reasoning": _REWRITER.replace(
        "{method}", "If it can be solved with a few simple thinking steps, rewrite it to explicitly ask for "
        "multiple-step reasoning."),
}

IN_BREADTH = (
    "I want you to act as a Prompt Creator. Draw inspiration from the given prompt to create a brand new prompt "
    "of the same domain that is even rarer. Its length and difficulty should be similar to the given prompt's, "
    "and a human must be able to understand and answer it. The words 'given prompt' and 'created prompt' must "
    "not appear in it.\n\n#Given Prompt#:\n{instruction}\n\n#Created Prompt#:"
)

# Words of the evolving prompts themselves: an evolved instruction that contains them copied the template.
TEMPLATE_WORDS = ("given prompt", "rewritten prompt", "created prompt", "#given prompt#", "#rewritten prompt#")

RATIONALE = (
    "{demos}Question: {question}\nThink step by step and explain your reasoning, then give the final answer on "
    "its own line starting with \"{marker}\"."
)
