"""twistd plugins for sockd.  Each module is imported only when used."""

from twisted.application.service import ServiceMaker

sockd = ServiceMaker(
    "sockd", "sockd.tap", "every sockd service enabled in the INI file", "sockd"
)
sockd_echo = ServiceMaker(
    "sockd-echo", "sockd.echo.tap", "line, raw and UDP echo (RFC 862)", "sockd-echo"
)
sockd_chat = ServiceMaker(
    "sockd-chat", "sockd.chat.tap", "UDP chat relay", "sockd-chat"
)
sockd_file = ServiceMaker(
    "sockd-file", "sockd.files.tap", "file server, netcat-compatible", "sockd-file"
)
