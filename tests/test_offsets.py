"""The offset rules without a broker: where a partition resumes and what may be committed."""

from recstream.stream.offsets import OffsetBook, resume_offset

T0, T1 = ("in", 0), ("in", 1)


def test_a_checkpoint_is_committed_once_and_only_for_partitions_still_assigned():
    book = OffsetBook()
    book.applied({T0: 40, T1: 70})
    assert book
    book.checkpoint_written({T0: 40, T1: 70})
    assert book.to_commit({T0}) == {T0: 40}  # T1 was revoked: its next owner reads it again
    book.committed({T0: 40})
    assert book.to_commit({T0}) == {} and book.uncommitted == {T1: 70}
    book.gone({T1})
    assert not book


def test_a_failed_commit_is_retried_from_the_checkpoint_without_new_events():
    book = OffsetBook()
    book.applied({T0: 40})
    book.checkpoint_written({T0: 40})
    assert book.to_commit({T0}) == {T0: 40}  # the commit fails: nothing recorded as committed
    assert book.to_commit({T0}) == {T0: 40}  # an idle stream commits it at the next turn


def test_nothing_is_committed_behind_where_a_partition_resumed():
    book = OffsetBook()
    book.checkpoint_written({T0: 40})  # snapshot taken before the partition moved on
    book.resumed(T0, 90, group_offset=90, checkpointed_state=True)  # another member went to 90
    assert book.to_commit({T0}) == {}
    book.checkpoint_written({T0: 95})
    assert book.to_commit({T0}) == {T0: 95}


def test_a_resume_ahead_of_the_group_waits_for_a_checkpoint_to_commit_it():
    book = OffsetBook()
    assert book.resumed(T0, 120, group_offset=100, checkpointed_state=True)  # a checkpoint must record it
    assert book.uncommitted == {T0: 120}
    assert not OffsetBook().resumed(T0, 120, group_offset=100, checkpointed_state=False)  # no state dir
    assert not OffsetBook().resumed(T0, 100, group_offset=100, checkpointed_state=True)  # the group agrees


def test_a_partition_resumes_at_the_state_unless_another_member_went_further():
    assert resume_offset(300, 500, ours=False) == 500
    assert resume_offset(300, 500, ours=True) == 300  # our own commit past a fallen-back checkpoint
    assert resume_offset(700, 500, ours=False) == 700
    assert resume_offset(None, 500, ours=False) is None
