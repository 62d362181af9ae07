"""OpenVPN 2.x server protocol (``--mode server``, TLS, optional tls-crypt), sans-IO.

Each part is its own module; users import a name from the module that holds it:

- :mod:`~relay.protocols.openvpn.wire`: opcodes, the control packet codec, the data
  packet header's sizes, TCP framing (``ssl_pkt.h``);
- :mod:`~relay.protocols.openvpn.keys`: the TLS-PRF, struct key2, cipher
  negotiation, the data channel's keys and replay window, key lifetimes (``ssl.c``,
  ``ssl_ncp.c``, ``crypto.c``, ``packet_id.c``);
- :mod:`~relay.protocols.openvpn.datachannel`: the data channel in batches
  (AES-256-GCM, CHACHA20-POLY1305), the reference for its C twin (``crypto.c``);
- :mod:`~relay.protocols.openvpn.tlscrypt`: tls-crypt wrapping and the static key
  file (``tls_crypt.c``);
- :mod:`~relay.protocols.openvpn.cookie`: the stateless HMAC answer to a UDP reset
  and the proof that a peer receives at its address (``mudp.c``);
- :mod:`~relay.protocols.openvpn.reliable`: the control channel's reliability layer
  (``reliable.c``);
- :mod:`~relay.protocols.openvpn.keymethod`: the key-method 2 messages (``ssl.c``);
- :mod:`~relay.protocols.openvpn.events`: what the server returns;
- :mod:`~relay.protocols.openvpn.server`: :class:`OpenVPNServer`, one client session.

The exchange, as the stock ``openvpn`` 2.6 client runs it::

    client                                   relay
    HARD_RESET_CLIENT_V2 sid=C pid=0     ->  TCP: an OpenVPNServer for the connection
                                         <-  HARD_RESET_SERVER_V2 sid=S ack[0] pid=0
                                             UDP: no state (cookie)
                                         <-  HARD_RESET_SERVER_V2 sid=S=cookie pid=0
    HARD_RESET_CLIENT_V2 sid=C pid=0
      ack[0] remote sid=S (or P_ACK_V1)  ->  the proof: OpenVPNServer(proof=...)
                                         <-  P_ACK_V1 ack[0] (the client's reset)
    P_CONTROL_V1 pid=1.. (TLS records)  <->  P_CONTROL_V1 / P_ACK_V1 (relay certificate)
    TLS data: key-method 2 (randoms,
      options, user/pass, peer-info)     ->  ClientAuth event
                                         <-  TLS data: key-method 2 (randoms, options)
      both sides derive data keys with the OpenVPN TLS-PRF
    TLS data: "PUSH_REQUEST"             ->  PushRequest event
                                         <-  "PUSH_REPLY,ifconfig ...,peer-id N,cipher C"
    P_DATA_V2 (the pushed cipher)       <->  Packets events / seal()

Wire formats follow OpenVPN's ``ssl_pkt.h``, ``reliable.c``, ``ssl.c``
(key_method_2_read/write, openvpn_PRF) and ``crypto.c`` (openvpn_encrypt_aead).
Nothing here imports the rest of the relay.
"""
