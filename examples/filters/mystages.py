"""Two Python stages (docs/filters.md), for a server started with
PYTHONPATH=examples/filters and these stages in its config's `filters:` list:
`{name: external, call: "mystages:tag_subject"}` and
`{name: bounces, call: "mystages:no_null_sender_to_many", roles: [mx]}`.
"""

from geosmtp.filters import Accept, Reject, Replace, cooperative


def tag_subject(envelope, message, context):
    """Put "[EXTERNAL]" in front of the Subject of mail from outside."""
    if context.role != "mx":
        return Accept()
    out = context.new_message()
    for line in message:  # the header section, line by line
        if line.lower().startswith(b"subject:"):
            line = b"Subject: [EXTERNAL] " + line[8:].lstrip()
        out.write(line)
        if line == b"\n":
            break
    while block := message.read(65536):  # the body, a block at a time
        out.write(block)
    return Replace(out)


@cooperative
def no_null_sender_to_many(envelope, message, context):
    """Refuse bounces (MAIL FROM:<>) to more than one recipient."""
    if envelope.sender is None and len(envelope.recipients) > 1:
        return Reject("bounce to many", text="A bounce has one recipient")
    return Accept()
