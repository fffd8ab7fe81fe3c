// A telemetry reader built on Azure's own Event Hubs SDK (@azure/event-hubs 6.0.4),
// unmodified, reading the hub's Event Hub-compatible endpoint over AMQP on port 5671
// with the connection string `hub connection-string --event-hub` prints. A device on
// Azure's Node device SDK (azure-iot-device + azure-iot-device-mqtt) sends the
// telemetry. Driven by tests/tests/amqp_event_hubs.rs.
//
// Usage: node azure_event_hubs.js <event hub connection string> <device connection string>
//
// The hub's CA comes in through NODE_EXTRA_CA_CERTS. Progress is one JSON object per
// line on stdout: {"event":"step","name":…} after each step, {"event":"done"} at the
// end, {"event":"error",…} (and exit 1) at the first failed check.
'use strict';

const {
  EventHubConsumerClient,
  earliestEventPosition,
  latestEventPosition,
} = require('@azure/event-hubs');
const { Client: DeviceClient, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');

function emit(event, fields) {
  process.stdout.write(JSON.stringify(Object.assign({ event }, fields || {})) + '\n');
}

function check(condition, what, detail) {
  if (!condition) {
    throw new Error(`check failed: ${what}${detail === undefined ? '' : ': ' + JSON.stringify(detail)}`);
  }
}

function step(name, fields) {
  emit('step', Object.assign({ name }, fields || {}));
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/// Subscribes with `options` (to `partition`, or all when undefined) and collects this
/// device's events until `enough(events)` or `ms` pass; then closes the subscription.
async function collect(client, deviceId, partition, options, enough, ms) {
  const events = [];
  const errors = [];
  let done;
  const finished = new Promise((resolve) => { done = resolve; });
  const handlers = {
    processEvents: async (batch, context) => {
      for (const e of batch) {
        if (e.systemProperties && e.systemProperties['iothub-connection-device-id'] === deviceId) {
          e.partitionIdSeen = context.partitionId;
          events.push(e);
        }
      }
      if (enough(events)) {
        done();
      }
    },
    processError: async (err) => { errors.push(String(err)); },
  };
  const opts = Object.assign({ maxBatchSize: 50, maxWaitTimeInSeconds: 1 }, options);
  const subscription = partition === undefined
    ? client.subscribe(handlers, opts)
    : client.subscribe(partition, handlers, opts);
  const timer = setTimeout(done, ms);
  await finished;
  clearTimeout(timer);
  await subscription.close();
  return { events, errors };
}

async function main() {
  const [ehCs, deviceCs] = process.argv.slice(2);
  const deviceId = /DeviceId=([^;]+)/.exec(deviceCs)[1];

  const device = DeviceClient.fromConnectionString(deviceCs, Mqtt);
  await device.open();
  for (const n of [1, 2, 3]) {
    const m = new Message(JSON.stringify({ n, temperature: 20 + n }));
    m.messageId = `eh-${n}`;
    m.contentType = 'application/json';
    m.contentEncoding = 'utf-8';
    m.properties.add('n', String(n));
    m.properties.add('alert', n === 3 ? 'high' : 'none');
    await device.sendEvent(m);
  }
  step('device_sent');

  const client = new EventHubConsumerClient('$Default', ehCs);
  const ids = await client.getPartitionIds();
  check(Array.isArray(ids) && ids.length > 0 && ids.every((id, i) => id === String(i)), 'partition ids', ids);
  const props = await client.getEventHubProperties();
  check(JSON.stringify(props.partitionIds) === JSON.stringify(ids), 'hub properties', props);
  step('partition_ids', { ids });

  // From the earliest: all three, in order, with Azure's annotations and the
  // device's properties.
  const early = await collect(client, deviceId, undefined, { startPosition: earliestEventPosition },
    (events) => events.length >= 3, 30000);
  check(early.events.length === 3, 'three events from earliest', { n: early.events.length, errors: early.errors });
  const byN = new Map(early.events.map((e) => [e.properties.n, e]));
  for (const n of ['1', '2', '3']) {
    const e = byN.get(n);
    check(e, `event ${n}`);
    check(e.body && e.body.n === Number(n) && e.body.temperature === 20 + Number(n), 'the JSON body', e.body);
    check(e.properties.alert === (n === '3' ? 'high' : 'none'), 'application properties', e.properties);
    check(e.messageId === `eh-${n}`, 'the message id', e.messageId);
    check(typeof e.sequenceNumber === 'number' && typeof e.offset === 'string', 'sequence number and offset', { s: e.sequenceNumber, o: e.offset });
    check(e.enqueuedTimeUtc instanceof Date && Math.abs(Date.now() - e.enqueuedTimeUtc.getTime()) < 600000, 'the enqueued time', e.enqueuedTimeUtc);
    check(e.systemProperties['iothub-connection-auth-method'], 'the auth method annotation', e.systemProperties);
    check(e.systemProperties['iothub-message-source'] === 'Telemetry', 'the message source', e.systemProperties);
  }
  step('from_earliest');

  // From a sequence number: the second event and what follows it in its partition.
  const second = byN.get('2');
  const part = second.partitionIdSeen;
  check(ids.includes(part), 'the partition of event 2', part);
  const fromSeq = await collect(client, deviceId, part,
    { startPosition: { sequenceNumber: second.sequenceNumber, isInclusive: true } },
    (events) => events.length >= 1, 30000);
  check(fromSeq.events.length >= 1 && fromSeq.events[0].properties.n === '2', 'from a sequence number, event 2 first',
    { got: fromSeq.events.map((e) => e.properties.n), errors: fromSeq.errors });
  const fromSeqExclusive = await collect(client, deviceId, part,
    { startPosition: { sequenceNumber: second.sequenceNumber, isInclusive: false } },
    (events) => events.length >= 1, 5000);
  check(fromSeqExclusive.events.every((e) => e.properties.n !== '2'), 'exclusive: not event 2',
    fromSeqExclusive.events.map((e) => e.properties.n));
  step('from_sequence_number');

  // From the latest: only what is sent after the receivers attached.
  const latest = [];
  let gotNew;
  const newArrived = new Promise((resolve) => { gotNew = resolve; });
  const subscription = client.subscribe({
    processEvents: async (batch) => {
      for (const e of batch) {
        if (e.systemProperties['iothub-connection-device-id'] === deviceId) {
          latest.push(e);
          gotNew();
        }
      }
    },
    processError: async () => {},
  }, { startPosition: latestEventPosition, maxBatchSize: 50, maxWaitTimeInSeconds: 1 });
  let sent = 0;
  for (let i = 0; i < 15 && latest.length === 0; i++) {
    const m = new Message(JSON.stringify({ n: 100 + i }));
    m.properties.add('n', String(100 + i));
    await device.sendEvent(m);
    sent += 1;
    await Promise.race([newArrived, sleep(2000)]);
  }
  await subscription.close();
  check(latest.length > 0, 'an event sent after subscribing from latest arrives', { sent });
  check(latest.every((e) => Number(e.properties.n) >= 100), 'nothing older than latest', latest.map((e) => e.properties.n));
  step('from_latest', { sent });

  await client.close();

  // The same entity over WebSockets (`/$servicebus/websocket` on 443).
  const wsClient = new EventHubConsumerClient('$Default', ehCs, { webSocketOptions: { webSocket: require('ws') } });
  const wsIds = await wsClient.getPartitionIds();
  check(JSON.stringify(wsIds) === JSON.stringify(ids), 'partition ids over WebSockets', wsIds);
  const overWs = await collect(wsClient, deviceId, undefined, { startPosition: earliestEventPosition },
    (events) => events.length >= 3, 30000);
  check(overWs.events.length >= 3, 'events from earliest over WebSockets', { n: overWs.events.length, errors: overWs.errors });
  await wsClient.close();
  step('websocket');

  await device.close();
  emit('done');
}

main().catch((err) => {
  emit('error', { error: String((err && err.stack) || err) });
  process.exit(1);
});
