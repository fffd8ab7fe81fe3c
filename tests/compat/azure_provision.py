"""A device that provisions through Azure's own Python device SDK (azure-iot-device
2.x), unmodified, driven by tests/tests/provisioning_sdk.rs.

  azure_provision.py HOST SCOPE REGISTRATION_ID DEVICE_KEY CA_PATH [websockets]

DEVICE_KEY `x509:CERT_PEM_PATH:KEY_PATH` registers with
create_from_x509_certificate instead, and connects the hub client with the same
certificate.

It registers with ProvisioningDeviceClient.create_from_symmetric_key (MQTT over TLS
on HOST:8883, or with `websockets` MQTT over WebSocket on HOST:443), prints the registration result as one JSON line, and when assigned
connects an IoTHubDeviceClient with the result, prints the twin's desired
properties, sends one telemetry message and prints that it was sent. Events: registered,
twin, sent, error.
"""

import json
import sys

from azure.iot.device import X509, IoTHubDeviceClient, Message, ProvisioningDeviceClient


def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


def main():
    host, scope, registration_id, key, ca_path = sys.argv[1:6]
    websockets = sys.argv[6:] == ["websockets"]
    with open(ca_path) as f:
        ca = f.read()
    x509 = None
    if key.startswith("x509:"):
        _, cert_file, key_file = key.split(":", 2)
        x509 = X509(cert_file=cert_file, key_file=key_file)
        client = ProvisioningDeviceClient.create_from_x509_certificate(
            provisioning_host=host,
            registration_id=registration_id,
            id_scope=scope,
            x509=x509,
            server_verification_cert=ca,
            websockets=websockets,
        )
    else:
        client = ProvisioningDeviceClient.create_from_symmetric_key(
            provisioning_host=host,
            registration_id=registration_id,
            id_scope=scope,
            symmetric_key=key,
            server_verification_cert=ca,
            websockets=websockets,
        )
    client.provisioning_payload = {"firmware": "1.0"}
    try:
        result = client.register()
    except Exception as err:  # the test expects refusals as events
        cause = err.__cause__
        emit(
            "error",
            stage="register",
            error=type(err).__name__,
            message=str(err),
            cause=type(cause).__name__ if cause else None,
            cause_message=str(cause) if cause else None,
        )
        return
    state = result.registration_state
    emit(
        "registered",
        status=result.status,
        device_id=state.device_id if state else None,
        assigned_hub=state.assigned_hub if state else None,
        substatus=state.sub_status if state else None,
        payload=state.response_payload if state else None,
    )
    if result.status != "assigned":
        return
    if x509 is not None:
        device = IoTHubDeviceClient.create_from_x509_certificate(
            x509=x509,
            hostname=state.assigned_hub,
            device_id=state.device_id,
            server_verification_cert=ca,
            websockets=websockets,
        )
    else:
        device = IoTHubDeviceClient.create_from_symmetric_key(
            symmetric_key=key,
            hostname=state.assigned_hub,
            device_id=state.device_id,
            server_verification_cert=ca,
            websockets=websockets,
        )
    device.connect()
    twin = device.get_twin()
    emit("twin", desired=twin.get("desired", {}))
    message = Message(
        json.dumps({"provisioned": registration_id}),
        content_type="application/json",
        content_encoding="utf-8",
    )
    message.message_id = "dps-" + registration_id
    device.send_message(message)
    emit("sent", message_id=message.message_id)
    device.shutdown()


if __name__ == "__main__":
    main()
