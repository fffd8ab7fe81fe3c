"""A telemetry reader built on Azure's own Python Event Hubs SDK (azure-eventhub 5.x),
unmodified, reading the hub's Event Hub-compatible endpoint over plain AMQP
(`UseDevelopmentEmulator=true`) with the connection string `hub connection-string
--event-hub` prints. Telemetry for the "from latest" step is published with paho-mqtt
over the hub's MQTT listener. Driven by tests/tests/amqp_event_hubs.rs.

Usage: python3 azure_eventhub.py <event hub connection string> <device id>
       <mqtt host> <mqtt port> <mqtt username> <mqtt password>

Progress is one JSON object per line on stdout: {"event":"step","name":...} after each
step, {"event":"done"} at the end, {"event":"error",...} (and exit 1) at the first
failed check.
"""

import json
import sys
import threading
import time
import traceback

from azure.eventhub import EventHubConsumerClient
import paho.mqtt.client as mqtt


def emit(event, **fields):
    print(json.dumps(dict(event=event, **fields)), flush=True)


def check(condition, what, detail=None):
    if not condition:
        raise AssertionError(f"check failed: {what}: {detail!r}")


def device_of(event):
    value = event.system_properties.get(b"iothub-connection-device-id")
    return value.decode() if isinstance(value, bytes) else value


def prop(event, key):
    value = (event.properties or {}).get(key.encode())
    return value.decode() if isinstance(value, bytes) else value


def collect(conn_str, device_id, enough, seconds, **receive_args):
    """Receives with `receive_args` in a thread until `enough(events)` or `seconds`."""
    client = EventHubConsumerClient.from_connection_string(conn_str, consumer_group="$Default")
    events = []
    errors = []
    done = threading.Event()

    def on_event(context, event):
        if event is not None and device_of(event) == device_id:
            event.partition_seen = context.partition_id
            events.append(event)
            if enough(events):
                done.set()

    def on_error(context, error):
        errors.append(repr(error))

    worker = threading.Thread(
        target=client.receive,
        kwargs=dict(on_event=on_event, on_error=on_error, max_wait_time=1, **receive_args),
        daemon=True,
    )
    worker.start()
    done.wait(seconds)
    client.close()
    worker.join(10)
    return events, errors


def main():
    conn_str, device_id, mqtt_host, mqtt_port, username, password = sys.argv[1:7]

    client = EventHubConsumerClient.from_connection_string(conn_str, consumer_group="$Default")
    ids = client.get_partition_ids()
    check(ids and ids == [str(i) for i in range(len(ids))], "partition ids", ids)
    props = client.get_eventhub_properties()
    check(props["partition_ids"] == ids, "hub properties", props)
    info = client.get_partition_properties(ids[0])
    check(info["id"] == ids[0] and "last_enqueued_sequence_number" in info, "partition properties", info)
    client.close()
    emit("step", name="partition_ids", ids=ids)

    events, errors = collect(conn_str, device_id, lambda e: len(e) >= 3, 30, starting_position="-1")
    check(len(events) == 3, "three events from earliest", dict(n=len(events), errors=errors))
    by_n = {prop(e, "n"): e for e in events}
    for n in ("1", "2", "3"):
        e = by_n.get(n)
        check(e is not None, f"event {n}", sorted(by_n))
        check(json.loads(e.body_as_str()) == {"n": int(n)}, "the body", e.body_as_str())
        check(prop(e, "kind") == "py", "application properties", e.properties)
        check(isinstance(e.sequence_number, int) and e.offset is not None, "sequence number and offset",
              (e.sequence_number, e.offset))
        check(e.enqueued_time is not None, "the enqueued time")
        check(e.system_properties.get(b"iothub-message-source") in (b"Telemetry", "Telemetry"),
              "the message source", e.system_properties)
    emit("step", name="from_earliest")

    second = by_n["2"]
    events, errors = collect(conn_str, device_id, lambda e: len(e) >= 1, 30,
                             partition_id=second.partition_seen,
                             starting_position=second.sequence_number,
                             starting_position_inclusive=True)
    check(events and prop(events[0], "n") == "2", "from a sequence number, event 2 first",
          dict(got=[prop(e, "n") for e in events], errors=errors))
    # The offset string resolves back to the same position (how the SDK resumes).
    events, errors = collect(conn_str, device_id, lambda e: len(e) >= 1, 30,
                             partition_id=second.partition_seen,
                             starting_position=second.offset,
                             starting_position_inclusive=False)
    check(all(prop(e, "n") != "2" for e in events), "after the offset: not event 2",
          [prop(e, "n") for e in events])
    emit("step", name="from_sequence_number")

    publisher = mqtt.Client(client_id=device_id, protocol=mqtt.MQTTv311)
    publisher.username_pw_set(username, password)
    publisher.connect(mqtt_host, int(mqtt_port))
    publisher.loop_start()
    latest = []
    arrived = threading.Event()
    consumer = EventHubConsumerClient.from_connection_string(conn_str, consumer_group="$Default")

    def on_event(context, event):
        if event is not None and device_of(event) == device_id:
            latest.append(event)
            arrived.set()

    worker = threading.Thread(
        target=consumer.receive,
        kwargs=dict(on_event=on_event, starting_position="@latest", max_wait_time=1),
        daemon=True,
    )
    worker.start()
    sent = 0
    for i in range(15):
        topic = f"devices/{device_id}/messages/events/n={100 + i}&kind=py"
        publisher.publish(topic, json.dumps({"n": 100 + i}), qos=1).wait_for_publish(10)
        sent += 1
        if arrived.wait(2):
            break
    consumer.close()
    worker.join(10)
    publisher.loop_stop()
    publisher.disconnect()
    check(latest, "an event sent after subscribing from latest arrives", sent)
    check(all(int(prop(e, "n")) >= 100 for e in latest), "nothing older than latest",
          [prop(e, "n") for e in latest])
    emit("step", name="from_latest", sent=sent)
    emit("done")


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001 - reported to the driving test
        emit("error", error=traceback.format_exc())
        sys.exit(1)
