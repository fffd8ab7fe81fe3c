// A back end built on Azure's own Node.js service SDK (azure-iothub 1.16), unmodified,
// driven by tests/tests/azure_service_sdk_compat.rs against the hub's HTTPS listener
// on port 443 (the only port the SDK dials). A device built on Azure's Node device SDK
// (azure-iot-device + azure-iot-device-mqtt, port 8883) answers the direct method.
//
// Usage: node azure_service.js <iothubowner connection string> <registryRead connection string>
//
// The hub's CA comes in through NODE_EXTRA_CA_CERTS (the service SDK has no option for
// it). Every step is checked; the first that fails prints {"event":"error",…} and the
// process exits 1. Progress is one JSON object per line on stdout: {"event":"step",
// "name":…} after each step, {"event":"done"} at the end.
'use strict';

const crypto = require('crypto');
const { Registry, Client: ServiceClient } = require('azure-iothub');
const { Client: DeviceClient } = require('azure-iot-device');
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

/// Runs `promise`, which must fail with one of `names`; returns the error.
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

function hostOf(connectionString) {
  return /HostName=([^;]+)/.exec(connectionString)[1];
}

async function main() {
  const [ownerCs, readCs] = process.argv.slice(2);
  const registry = Registry.fromConnectionString(ownerCs);

  // Create with generated keys: registry.create fills in empty keys.
  const created = (await registry.create({ deviceId: 'svc-1' })).responseBody;
  const keys = created.authentication.symmetricKey;
  check(Buffer.from(keys.primaryKey, 'base64').length === 32, 'a generated primary key', keys.primaryKey);
  check(keys.secondaryKey && keys.secondaryKey !== keys.primaryKey, 'a generated secondary key');
  step('create');

  const got = (await registry.get('svc-1')).responseBody;
  check(got.deviceId === 'svc-1' && got.status === 'enabled' && got.etag, 'get', got);
  step('get');

  // update and delete send If-Match: "*" by default.
  got.status = 'disabled';
  got.statusReason = 'maintenance';
  const updated = (await registry.update(got)).responseBody;
  check(updated.status === 'disabled' && updated.statusReason === 'maintenance', 'update', updated);
  check(updated.authentication.symmetricKey.primaryKey === keys.primaryKey, 'update keeps the keys');
  check(updated.etag !== got.etag, 'update changes the etag');
  step('update');

  // Bulk add (at most 100 per call) and list more than 100.
  const ids = Array.from({ length: 150 }, (_, n) => `bulk-${String(n).padStart(3, '0')}`);
  for (const batch of [ids.slice(0, 100), ids.slice(100)]) {
    const result = (await registry.addDevices(batch.map((deviceId) => ({ deviceId })))).responseBody;
    check(result.isSuccessful === true && result.errors.length === 0, 'addDevices', result);
  }
  const listed = (await registry.list()).responseBody;
  const listedIds = new Set(listed.map((d) => d.deviceId));
  check(listed.length === 151, 'list returns every device', listed.length);
  check(ids.every((id) => listedIds.has(id)), 'list has every bulk device');
  const stats = (await registry.getRegistryStatistics()).responseBody;
  check(stats.totalDeviceCount === 151 && stats.disabledDeviceCount === 1, 'statistics', stats);
  step('bulk_and_list', { listed: listed.length });

  // Twin get and update (with the twin's own etag), then tags on a few more with "*".
  const twin = (await registry.getTwin('bulk-000')).responseBody;
  check(twin.deviceId === 'bulk-000' && twin.properties.desired.$version === 1, 'getTwin', twin);
  const patched = (await twin.update({ tags: { fleet: 'node' }, properties: { desired: { rate: 3 } } })).result;
  check(patched.tags.fleet === 'node' && patched.properties.desired.rate === 3, 'twin.update', patched);
  for (const id of ids.slice(1, 5)) {
    const result = (await registry.updateTwin(id, { tags: { fleet: 'node' } }, '*')).responseBody;
    check(result.tags.fleet === 'node', 'updateTwin', result);
  }
  step('twin');

  // A tag query, paged two at a time through nextAsTwin.
  const query = registry.createQuery("SELECT * FROM devices WHERE tags.fleet = 'node'", 2);
  const found = [];
  let pages = 0;
  while (query.hasMoreResults) {
    const page = (await query.nextAsTwin()).result;
    pages += 1;
    check(pages <= 10, 'the query ends');
    for (const t of page) {
      check(t.tags.fleet === 'node' && typeof t.update === 'function', 'query results are twins', t.deviceId);
      found.push(t.deviceId);
    }
  }
  found.sort();
  check(JSON.stringify(found) === JSON.stringify(ids.slice(0, 5)), 'the tag query finds the tagged devices', found);
  check(pages === 3, 'the query pages', pages);
  step('query', { pages });

  // A direct method to a device on Azure's Node device SDK.
  const device = (await registry.create({ deviceId: 'svc-device' })).responseBody;
  const deviceCs = `HostName=${hostOf(ownerCs)};DeviceId=svc-device;SharedAccessKey=${device.authentication.symmetricKey.primaryKey}`;
  const deviceClient = DeviceClient.fromConnectionString(deviceCs, Mqtt);
  deviceClient.onDeviceMethod('reboot', (request, response) => {
    response.send(200, { rebooted: true, delay: request.payload.delay }, (err) => err && emit('error', { error: String(err) }));
  });
  await deviceClient.open();
  const service = ServiceClient.fromConnectionString(ownerCs);
  // connectTimeoutInSeconds: the device subscribes to methods just after connecting.
  const answer = (await service.invokeDeviceMethod('svc-device', {
    methodName: 'reboot',
    payload: { delay: 5 },
    responseTimeoutInSeconds: 30,
    connectTimeoutInSeconds: 30,
  })).result;
  check(answer.status === 200 && answer.payload.rebooted === true && answer.payload.delay === 5, 'invokeDeviceMethod', answer);
  await deviceClient.close();
  step('method');

  // Delete (If-Match: "*"), then the SDK's typed error.
  await registry.delete('svc-1');
  await expectError(registry.get('svc-1'), ['DeviceNotFoundError'], 'get after delete');
  step('delete');

  // A wrong key is refused.
  const wrongKey = ownerCs.replace(/SharedAccessKey=.*$/, `SharedAccessKey=${crypto.randomBytes(32).toString('base64')}`);
  check(wrongKey !== ownerCs, 'a different key');
  await expectError(Registry.fromConnectionString(wrongKey).get('bulk-000'), ['UnauthorizedError'], 'a wrong key');
  step('wrong_key');

  // registryRead reads and may not write.
  const reader = Registry.fromConnectionString(readCs);
  const read = (await reader.get('bulk-000')).responseBody;
  check(read.deviceId === 'bulk-000', 'registryRead reads');
  const refused = await expectError(
    reader.create({ deviceId: 'not-allowed' }),
    ['UnauthorizedError'],
    'registryRead writing',
  );
  check(refused.response && refused.response.statusCode === 401, 'refused with 401', refused.response && refused.response.statusCode);
  step('read_only');

  emit('done');
}

main().catch((err) => {
  emit('error', { error: String((err && err.stack) || err) });
  process.exit(1);
});
