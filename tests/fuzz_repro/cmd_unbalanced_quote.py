"""Text commands shlex cannot split: a traceback ("bug in write", ValueError from
shlex) and EIO instead of EINVAL with an `error:` reply."""
from _common import MNT, os

for text in ("create_vm 'x\n", "api_version \\\n", 'check_extension "hlt\n'):
    fd = os.open(os.path.join(MNT, "cmd"), os.O_RDWR)
    try:
        os.write(fd, text.encode())
    except OSError as e:
        print(repr(text), e)                              # EIO; daemon log: Traceback ... ValueError
    os.close(fd)
