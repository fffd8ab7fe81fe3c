"""A device built on Azure's own Python device SDK (azure-iot-device 2.x), unmodified,
driven by tests/tests/azure_sdk_compat.rs.

It connects with a connection string and the hub's CA (with a third argument
`websockets`, over MQTT over WebSocket on port 443), then reports what happens as
one JSON object per line on stdout, and takes commands as lines on stdin:

  send <message-id>    send one telemetry message (JSON body, content type JSON)
  twin                 GET the twin and print it
  report <json>        patch reported properties
  quit                 disconnect and exit

Events printed: ready, sent, twin, reported, desired, method, c2d, error.
"""

import json
import sys
import threading

from azure.iot.device import IoTHubDeviceClient, Message, MethodResponse

out_lock = threading.Lock()


def emit(event, **fields):
    with out_lock:
        print(json.dumps({"event": event, **fields}), flush=True)


def main():
    connection_string, ca_path = sys.argv[1], sys.argv[2]
    websockets = sys.argv[3:] == ["websockets"]
    with open(ca_path) as f:
        ca = f.read()
    client = IoTHubDeviceClient.create_from_connection_string(
        connection_string,
        server_verification_cert=ca,
        keep_alive=30,
        websockets=websockets,
    )

    def on_desired(patch):
        emit("desired", patch=patch)

    def on_method(request):
        emit("method", name=request.name, payload=request.payload)
        response = MethodResponse.create_from_method_request(
            request, 200, {"handled": request.name, "payload": request.payload}
        )
        client.send_method_response(response)

    def on_message(message):
        emit(
            "c2d",
            body=message.data.decode("utf-8", "replace"),
            message_id=message.message_id,
            properties=message.custom_properties,
        )

    client.on_twin_desired_properties_patch_received = on_desired
    client.on_method_request_received = on_method
    client.on_message_received = on_message
    client.connect()
    emit("ready")

    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        try:
            if command == "send":
                message = Message(
                    json.dumps({"from": "azure-sdk", "id": argument}),
                    content_type="application/json",
                    content_encoding="utf-8",
                )
                message.message_id = argument
                message.custom_properties["sdk"] = "azure-iot-device"
                client.send_message(message)
                emit("sent", message_id=argument)
            elif command == "twin":
                emit("twin", twin=client.get_twin())
            elif command == "report":
                client.patch_twin_reported_properties(json.loads(argument))
                emit("reported")
            elif command == "quit":
                break
        except Exception as error:  # reported to the test, which fails on it
            emit("error", command=command, error=repr(error))
    client.shutdown()


if __name__ == "__main__":
    main()
