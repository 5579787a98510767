"""Problems to show the user: the exceptions the plugins turn into messages, and one-paragraph
messages for the client's `error` lines and exits."""


class FrisketError(Exception):
    """A problem to show the user as a message (never a traceback)."""


class ClientNotFound(FrisketError):
    pass


class ProtocolError(FrisketError):
    pass


_CODE_HINTS = {
    "UNAVAILABLE": "No Frisket server answered at {server}. Start one (`frisket-server serve --models DIR`) "
    "or fix the server address.",
    "USAGE": "The plugin built arguments the client did not accept (client too old or too new?): {message}",
    "INVALID_INPUT": "The client could not read an input file: {message}",
    "IO": "The client could not write its output: {message}",
    "PROTOCOL": "The server's answer was malformed: {message}",
    "CANCELLED": "The job was cancelled.",
    "RESOURCE_EXHAUSTED": "The server is busy (its queue is full); try again in a moment. ({message})",
    "NOT_FOUND": "The server does not know that: {message}",
    "UNIMPLEMENTED": "This server does not support that yet: {message}",
}


# Every limit refusal names its limit this way, e.g. "... (max_side)".
LIMIT_MARK = "(max_"


def describe_error(event, server=None):
    """A one-paragraph message for an `error` line."""
    code = str(event.get("code") or "ERROR")
    message = str(event.get("message") or "").strip()
    hint = _CODE_HINTS.get(code)
    if LIMIT_MARK in message:
        # A request over one of the server's limits (refused by the client before sending,
        # or by the server, with the same message naming the limit).
        text = (
            "This job is over the server's limits: {} Make the image smaller, use fewer steps or fast Grad-SAM, "
            "or ask the server's operator to raise the limit (`frisket info` lists them).".format(
                message.rstrip(".") + "."
            )
        )
    elif hint:
        text = hint.format(server=server or "the configured address", message=message)
    elif message:
        text = "{} ({})".format(message, code)
    else:
        text = code
    if "outside this job's schedule" in message:
        text += (
            " Grad-SAM manipulates at t = 780, 520 and 320, so the job must start above t = 780: raise the "
            "strength or the steps (0.85 or more at 20 steps), or set Explain to off."
        )
    return text


def describe_exit(exit_code, stderr_text="", server=None):
    """A message for a client that ended without an `error` line (crashed, killed, too
    old to know --json)."""
    last = ""
    for line in (stderr_text or "").splitlines():
        if line.strip():
            last = line.strip()
    if last.startswith("error: "):
        body = last[len("error: ") :]
        code, _, message = body.partition(": ")
        if code.isupper():
            return describe_error({"code": code, "message": message}, server)
        return body
    if exit_code == 3:
        return describe_error({"code": "UNAVAILABLE"}, server)
    if exit_code is None or exit_code < 0:
        return "The Frisket client stopped unexpectedly{}.".format(": " + last if last else "")
    return "The Frisket client failed (exit code {}){}".format(exit_code, ": " + last if last else ".")
