"""An app that pickles an instance of its own class, which needs the startup
file registered in sys.modules under its own name."""

import pickle


class Token:
    def __init__(self, value: str) -> None:
        self.value = value


def application(environ, start_response):  # type: ignore[no-untyped-def]
    token = pickle.loads(pickle.dumps(Token("round trip")))
    body = f"{type(token).__module__}:{token.value}".encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
