"""A plan's run prepared once: which memory every tensor of every step lives in.

A plan names its tensors (``"x"`` the state, ``("d", 3)`` a history term, ...). Where each
of them lives at each step depends only on the plan and on who may see the states:

* owned (``fastdiff.sample``, ``Sampler.step(..., donate=True)``): the loop's states and
  model inputs are its own, so a dead one is overwritten by a later output (in place);
* shown (the plain step API): every state and model input a step returns is a new
  tensor the caller may keep, and so is every output (the op allocates them from its
  pool of recycled blocks, which costs no more than reusing history in place).

So the buffer choice is made here, once per plan and mode, the way a compiler assigns
registers: each tensor gets a slot, and a slot whose tensor is dead takes a later
output. At run time a step only looks up its :class:`Recipe` and calls the fused op on
the slots' tensors (``Sampler._fast_step``): no per-step bookkeeping in Python.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["Recipe", "build"]


class Recipe(NamedTuple):
    """What one step does with the run's slots (a list of tensors, or None where empty).

    x_slot: the slot the incoming state is put in (the caller's x).
    x_owned: the state is the loop's own (it was the previous step's output), so its
        slot may take an output of this step.
    history, x_base: slots of the op's history inputs and of x_base (-1: none).
    outs: the slot of each output (in shown mode the op's new tensors are put there;
        an internal slot gets its tensor the same way the first time it is written).
    release: slots whose tensors are not needed after this step (references dropped).
    names: (name, slot, private) of the named tensors alive before the step (private:
        the sampler's own, never shown to the caller), so a run can leave the program
        and continue by names (``Sampler._leave_program``).
    """
    x_slot: int
    x_owned: bool
    history: tuple
    x_base: int
    outs: tuple
    release: tuple
    names: tuple


def build(calls, drop, owned: bool) -> tuple:
    """(recipes of every call of a plan, whether each slot is internal). ``calls``: the
    plan's calls; ``drop[k]``:
    names whose last reader is call k; ``owned``: the loop owns its states (see above).
    Slots hold either the sampler's own tensors ("internal": allocated once, reused
    when dead) or others ("external": the incoming states and, in shown mode, every
    output; never written, dropped when dead)."""
    internal = []          # per slot: internal?
    free = {True: [], False: []}
    where = {}             # live name -> slot
    private = set()        # external slots holding history (never shown to the caller)
    state = -1             # internal slot of the state (owned mode, after the first step)
    x_in = -1              # internal slot of the folded model input (owned mode)

    def new(kind):
        if free[kind]:
            return free[kind].pop()
        internal.append(kind)
        return len(internal) - 1

    recipes = []
    for k, call in enumerate(calls):
        op = call.op
        names = tuple((n, s, internal[s] or s in private) for n, s in where.items())
        x_owned = state >= 0
        x_slot = state if x_owned else new(False)
        private.discard(x_slot)
        if op.keep_x is not None:
            where[op.keep_x] = x_slot
        history = tuple(where[n] for n in op.history)
        x_base = where[op.x_base] if op.x_base is not None else -1
        dying = set(drop[k])
        held = {s for n, s in where.items() if n not in dying}
        # Dead after this step and ours, in the order outputs prefer them: the state (an
        # in-place update), the model input, then the history read for the last time.
        candidates = []
        for s in [x_slot if x_owned else -1, x_in] + [where[n] for n in drop[k]]:
            if s >= 0 and internal[s] and s not in held and s not in candidates:
                candidates.append(s)
        outs = []
        for name in op.outputs:
            if not owned:
                s = new(False)
            elif candidates:
                s = candidates.pop(0)
            else:
                s = new(True)
            outs.append(s)
        for n in dying:
            where.pop(n, None)
        for o, name in enumerate(op.outputs):
            if name not in ("x", "x_in"):
                where[name] = outs[o]
                private.add(outs[o])
            else:
                private.discard(outs[o])
        new_state = outs[op.outputs.index("x")] if owned else -1
        new_x_in = outs[op.outputs.index("x_in")] if owned and "x_in" in op.outputs else -1
        alive = set(where.values()) | {new_state, new_x_in}
        touched = {x_slot, x_in, *history, x_base, *outs} - {-1}
        release = tuple(sorted(s for s in touched if s not in alive and not internal[s]))
        for s in touched:
            if s not in alive:
                free[internal[s]].append(s)
        recipes.append(Recipe(x_slot, x_owned, history, x_base, tuple(outs), release, names))
        state, x_in = new_state, new_x_in
    return tuple(recipes), tuple(internal)
