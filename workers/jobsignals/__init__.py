"""Job signals: a client's word to the host that owns a running job (abort, setspeed, ...).

protocol.py  the channels and operations both ends agree on
sender.py    the client's end: publish a signal, wait for the owner's reply
listener.py  the job owner's end: the subscription on the agent loop, replies
handlers.py  what each operation does to the job and its guest
"""
