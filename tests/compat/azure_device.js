// A device built on Azure's own Node.js device SDK (azure-iot-device 1.18 with
// azure-iot-device-mqtt), unmodified, driven by tests/tests/azure_node_sdk_compat.rs.
//
// Usage: node azure_device.js <connection string> <CA PEM path> <model id> [MqttWs]
//
// It connects over MQTT (TLS, port 8883) — or with `MqttWs`, over MQTT over WebSocket
// (port 443) — with the hub's CA and a Plug and Play model
// id, then reports what happens as one JSON object per line on stdout, and takes
// commands as JSON objects, one per line, on stdin:
//
//   {"cmd": "send", "id": "...", "correlationId": "...", "properties": {...}}
//                         send one telemetry message (JSON body, content type JSON)
//   {"cmd": "twin"}       GET the twin and print it
//   {"cmd": "report", "patch": {...}}
//                         patch reported properties; prints reported or report_failed
//   {"cmd": "quit"}       close and exit
//
// Events printed: ready, sent, twin, reported, report_failed, desired, method, c2d,
// error. Methods `reboot` and `thermostat1*getMaxMinReport` are answered with 200.
'use strict';

const fs = require('fs');
const readline = require('readline');
const { Client, Message } = require('azure-iot-device');
const { Mqtt, MqttWs } = require('azure-iot-device-mqtt');

function emit(event, fields) {
  process.stdout.write(JSON.stringify(Object.assign({ event }, fields || {})) + '\n');
}

function fail(command, err) {
  emit('error', { command, error: String((err && err.stack) || err) });
}

async function main() {
  const [connectionString, caPath, modelId, transport] = process.argv.slice(2);
  const client = Client.fromConnectionString(connectionString, transport === 'MqttWs' ? MqttWs : Mqtt);
  await client.setOptions({ ca: fs.readFileSync(caPath, 'utf8'), modelId, keepalive: 30 });

  client.on('error', (err) => fail('client', err));
  client.on('message', (msg) => {
    const properties = {};
    for (let i = 0; i < msg.properties.count(); i++) {
      const p = msg.properties.getItem(i);
      properties[p.key] = p.value;
    }
    emit('c2d', {
      body: msg.getData().toString('utf8'),
      messageId: msg.messageId,
      correlationId: msg.correlationId,
      contentType: msg.contentType,
      to: msg.to,
      expiryTimeUtc: msg.expiryTimeUtc,
      properties,
    });
    client.complete(msg, (err) => err && fail('complete', err));
  });
  for (const name of ['reboot', 'thermostat1*getMaxMinReport']) {
    client.onDeviceMethod(name, (request, response) => {
      emit('method', { name: request.methodName, payload: request.payload });
      response.send(200, { handled: request.methodName, payload: request.payload }, (err) => err && fail('method', err));
    });
  }

  await client.open();
  const twin = await client.getTwin();
  twin.on('properties.desired', (patch) => emit('desired', { patch }));
  emit('ready');

  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (!line.trim()) continue;
    let command;
    try {
      command = JSON.parse(line);
    } catch (err) {
      fail('parse', err);
      continue;
    }
    try {
      if (command.cmd === 'send') {
        const message = new Message(JSON.stringify({ from: 'azure-node-sdk', id: command.id }));
        message.messageId = command.id;
        message.correlationId = command.correlationId;
        message.contentType = 'application/json';
        message.contentEncoding = 'utf-8';
        for (const [key, value] of Object.entries(command.properties || {})) {
          message.properties.add(key, value);
        }
        await client.sendEvent(message);
        emit('sent', { id: command.id });
      } else if (command.cmd === 'twin') {
        const fresh = await client.getTwin();
        // getTwin returns the SDK's cached object; ask the hub again for its state.
        await new Promise((resolve, reject) => fresh.get((err) => (err ? reject(err) : resolve())));
        emit('twin', { desired: fresh.properties.desired, reported: fresh.properties.reported });
      } else if (command.cmd === 'report') {
        twin.properties.reported.update(command.patch, (err) => {
          if (err) emit('report_failed', { message: err.message });
          else emit('reported');
        });
      } else if (command.cmd === 'quit') {
        break;
      }
    } catch (err) {
      fail(command.cmd, err);
    }
  }
  await client.close();
  process.exit(0);
}

main().catch((err) => {
  fail('main', err);
  process.exit(1);
});
