"""Input offsets: where each partition resumes, and what may be committed when.

The service commits an input offset only once what it learned from the events before it is safe:
with a state dir, once a checkpoint holding that position is written (effectively-once: a crash
resumes from the checkpoint and the group's offset agrees with it); without one, once the updates
of those events are delivered. :class:`OffsetBook` keeps the four offsets per partition that
decide this and the rules that use them; the service only calls it, so the rules are testable
without a broker. Partitions are ``(topic, partition)`` tuples; an offset is the next one to read.
"""

from __future__ import annotations

TopicPartitionKey = tuple[str, int]


def resume_offset(position: int | None, group_offset: int, ours: bool) -> int | None:
    """Where a newly assigned partition resumes, given the state's position in it (None: the
    state holds none), the group's committed offset (negative: none) and whether that offset is
    this state dir's own last commit. None: the state has no say (``topics.start_from`` decides).

    Our own commit never outranks our state: after falling back to an older checkpoint, the events
    since it must be read again. Another member's may: it went further while it owned the
    partition, and those events are in its state.

    >>> resume_offset(None, 500, ours=False) is None
    True
    >>> resume_offset(300, 500, ours=True)  # our commit, our older checkpoint: read 300.. again
    300
    >>> resume_offset(300, 500, ours=False)  # another member went on to 500
    500
    >>> resume_offset(300, -1001, ours=False)  # no group offset
    300
    """
    if position is None:
        return None
    return position if ours else max(position, group_offset)


class OffsetBook:
    """Per partition: applied but not committed, covered by the newest written checkpoint,
    committed to the group, and the floor below which nothing may be committed (where the
    partition resumed at its assignment).

    >>> book = OffsetBook()
    >>> book.resumed(("t", 0), 100, group_offset=100, checkpointed_state=True)
    False
    >>> book.applied({("t", 0): 150})
    >>> book.checkpoint_written({("t", 0): 150})
    >>> book.to_commit(assigned={("t", 0)})  # the checkpoint covers 150: commit it
    {('t', 0): 150}
    >>> book.committed({("t", 0): 150}); book.uncommitted
    {}
    >>> book.to_commit(assigned={("t", 0)})  # the group has it already
    {}
    """

    def __init__(self) -> None:
        self.uncommitted: dict[TopicPartitionKey, int] = {}  # next offsets applied but not committed
        self.checkpointed: dict[TopicPartitionKey, int] = {}  # offsets the newest written checkpoint covers
        self.group: dict[TopicPartitionKey, int] = {}  # offsets last committed to the group
        self.floor: dict[TopicPartitionKey, int] = {}  # where each partition resumed at its assignment

    def __bool__(self) -> bool:
        """Whether anything applied is not committed yet."""
        return bool(self.uncommitted)

    def applied(self, next_offsets: dict[TopicPartitionKey, int]) -> None:
        """Events up to ``next_offsets`` (exclusive) are applied to the model."""
        self.uncommitted.update(next_offsets)

    def resumed(self, tp: TopicPartitionKey, offset: int, group_offset: int, checkpointed_state: bool) -> bool:
        """Partition ``tp`` resumes at ``offset`` (the group has ``group_offset``). Nothing is ever
        committed behind it. Returns whether a checkpoint must record it: with a state dir
        (``checkpointed_state``), a resume ahead of the group (lost before its commit, a crash between
        checkpoint and commit) is committed by the next checkpoint, even on an idle stream."""
        self.floor[tp] = offset
        if checkpointed_state and offset != group_offset:
            self.uncommitted.setdefault(tp, offset)
            return True
        return False

    def checkpoint_written(self, covered: dict[TopicPartitionKey, int]) -> None:
        """A checkpoint holding these positions is on disk."""
        self.checkpointed.update(covered)

    def to_commit(self, assigned: set[TopicPartitionKey]) -> dict[TopicPartitionKey, int]:
        """What the newest written checkpoint covers and the group lacks: only for partitions still
        assigned, and never behind where a partition resumed since that checkpoint's snapshot.

        Usually that is the checkpoint just written; it is also a commit that failed (the broker
        was away) or partitions lost before their commit and assigned back: on an idle stream no
        new checkpoint would ever come to commit them.

        >>> book = OffsetBook()
        >>> book.checkpoint_written({("t", 0): 10, ("t", 1): 10})
        >>> book.resumed(("t", 0), 20, group_offset=20, checkpointed_state=True)  # moved on meanwhile
        False
        >>> book.to_commit(assigned={("t", 0)})  # t/0: behind its floor; t/1: not ours
        {}
        """
        return {tp: offset for tp, offset in self.checkpointed.items()
                if tp in assigned and offset >= self.floor.get(tp, 0) and self.group.get(tp) != offset}

    def committed(self, offsets: dict[TopicPartitionKey, int]) -> None:
        """The group has ``offsets`` now."""
        self.group.update(offsets)
        for tp, offset in offsets.items():
            if self.uncommitted.get(tp) == offset:
                del self.uncommitted[tp]

    def gone(self, partitions: set[TopicPartitionKey]) -> None:
        """Partitions revoked or lost: their uncommitted offsets are the next owner's to read again."""
        for tp in partitions:
            self.uncommitted.pop(tp, None)
