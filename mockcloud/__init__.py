"""Local stand-ins for the cloud services the daemons talk to, for tests and the demo.

Not part of the installed daemon. Each server runs on 127.0.0.1 with throwaway CAs written as PEM
files, records what clients send, and can be told to misbehave the way real services sometimes
do. `python -m mockcloud --help` runs them from a shell.

* `mockcloud.est.EstServer`: an RFC 7030 EST server (certd's `method = "est"`).
* `mockcloud.cloud.Cloud`: a DPS double (`mockcloud.dps.DpsServer`) and an IoT Hub double
  (`mockcloud.hub.HubServer`) sharing one device registry (identityd's provisioning).
* `mockcloud.sas`: SAS tokens as DPS and IoT Hub use them (make, parse, verify, group keys).
* `mockcloud.ca`: the CA helpers every mock server uses.
* `mockcloud.https`: HTTPS serving on a background thread, shared by the servers.
"""
