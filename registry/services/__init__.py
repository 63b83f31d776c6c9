"""Keyword-only service functions over a Session. They never commit: the caller owns the
transaction (``with session.begin():``), so a failure anywhere leaves nothing written."""
