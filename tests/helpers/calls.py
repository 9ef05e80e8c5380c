"""A wrapper that counts the calls of a function (which rule or kernel a computation took)."""


def spy(calls: list, function):
    """`function`, appending 1 to `calls` at each call."""

    def counted(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return counted
