// A back end built on Azure's own Node.js service SDK (azure-iothub 1.16), unmodified,
// sending cloud-to-device messages over AMQP (its default transport, `Amqp`, which
// always dials port 5671) to a device on Azure's Node device SDK (azure-iot-device +
// azure-iot-device-mqtt, port 8883), reading the feedback, and seeing the typed error
// for an unknown device. Driven by tests/tests/amqp_service.rs.
//
// Usage: node azure_amqp_service.js <service connection string> <device connection string> [Amqp|AmqpWs]
// (AmqpWs: AMQP over WebSockets on port 443, /$iothub/websocket.)
//
// The hub's CA comes in through NODE_EXTRA_CA_CERTS. Every step is checked; the first
// that fails prints {"event":"error",…} and the process exits 1. Progress is one JSON
// object per line on stdout: {"event":"step","name":…} after each step,
// {"event":"done"} at the end.
'use strict';

const { Client: ServiceClient, Amqp, AmqpWs } = require('azure-iothub');
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

function errorName(err) {
  return (err && err.constructor && err.constructor.name) || (err && err.name) || String(err);
}

async function expectError(promise, names, what) {
  try {
    await promise;
  } catch (err) {
    if (names.includes(errorName(err)) || names.includes(err.name)) {
      return err;
    }
    throw new Error(`${what}: expected ${names.join(' or ')}, got ${errorName(err)}: ${err.message}`);
  }
  throw new Error(`${what}: succeeded, expected ${names.join(' or ')}`);
}

function step(name, fields) {
  emit('step', Object.assign({ name }, fields || {}));
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function main() {
  const [serviceCs, deviceCs, transportName] = process.argv.slice(2);
  const Transport = transportName === 'AmqpWs' ? AmqpWs : Amqp;
  const deviceId = /DeviceId=([^;]+)/.exec(deviceCs)[1];

  const device = DeviceClient.fromConnectionString(deviceCs, Mqtt);
  const received = [];
  let wake = () => {};
  device.on('message', (msg) => {
    received.push(msg);
    device.complete(msg, (err) => err && emit('error', { error: 'complete: ' + String(err) }));
    wake();
  });
  await device.open();
  step('device_open');

  const service = ServiceClient.fromConnectionString(serviceCs, Transport);
  await withTimeout(service.open(), 30000, 'service open over AMQP');
  step('service_open');

  const sent = new Message(JSON.stringify({ command: 'blink', times: 3 }));
  sent.messageId = 'amqp-c2d-1';
  sent.correlationId = 'corr-1';
  sent.ack = 'full';
  sent.properties.add('color', 'red');
  sent.properties.add('priority', 'high');
  const arrived = new Promise((resolve) => { wake = resolve; });
  await withTimeout(service.send(deviceId, sent), 30000, 'send');
  step('send');

  await withTimeout(arrived, 30000, 'the device receives the message');
  const got = received[0];
  check(got.data.toString() === JSON.stringify({ command: 'blink', times: 3 }), 'the body', got.data.toString());
  check(got.messageId === 'amqp-c2d-1', 'the message id', got.messageId);
  check(got.correlationId === 'corr-1', 'the correlation id', got.correlationId);
  check(got.properties.getValue('color') === 'red', 'property color', got.properties.propertyList);
  check(got.properties.getValue('priority') === 'high', 'property priority', got.properties.propertyList);
  step('device_receives');

  // The device completed it: the feedback receiver gets Success for it.
  const receiver = await withTimeout(new Promise((resolve, reject) => {
    service.getFeedbackReceiver((err, r) => (err ? reject(err) : resolve(r)));
  }), 30000, 'getFeedbackReceiver');
  const feedback = await withTimeout(new Promise((resolve, reject) => {
    receiver.on('errorReceived', reject);
    receiver.on('message', (msg) => {
      const records = JSON.parse(msg.data.toString());
      const mine = records.find((r) => r.originalMessageId === 'amqp-c2d-1');
      if (mine) {
        resolve(mine);
      }
    });
  }), 30000, 'feedback for the message');
  check(feedback.statusCode === 'Success', 'feedback status', feedback);
  check(feedback.deviceId === deviceId, 'feedback device', feedback);
  step('feedback');

  // An unknown device: the typed error, and the client goes on working.
  await expectError(service.send('no-such-device', new Message('x')), ['DeviceNotFoundError'], 'send to an unknown device');
  step('unknown_device');
  const second = new Promise((resolve) => { wake = resolve; });
  await withTimeout(service.send(deviceId, new Message('again')), 30000, 'send after a refusal');
  await withTimeout(second, 30000, 'the device receives the second message');
  check(received[1].data.toString() === 'again', 'the second body', received[1].data.toString());
  step('send_after_refusal');

  await service.close();
  await device.close();
  emit('done');
}

main().catch((err) => {
  emit('error', { error: String((err && err.stack) || err) });
  process.exit(1);
});
