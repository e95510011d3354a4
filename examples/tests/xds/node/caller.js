// Calls greeter.v1.GreeterService/SayHello through a grpc-js channel to an `xds:///` target, one
// call at a time, and prints one line per call: `ok <instance_id>` or `err <CODE> <details>`,
// as caller.py does. The channel is configured by the bootstrap file GRPC_XDS_BOOTSTRAP names.
'use strict';

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
require('@grpc/grpc-js-xds').register();

function arg(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  if (at >= 0 && at + 1 < process.argv.length) return process.argv[at + 1];
  if (fallback === undefined) {
    console.error(`--${name} is required`);
    process.exit(2);
  }
  return fallback;
}

const target = arg('target');
const protoDir = arg('proto-dir');
const pauseMs = Number(arg('pause-ms', '2'));
const timeoutMs = Number(arg('timeout-ms', '5000'));

const definition = protoLoader.loadSync('greeter/v1/greeter.proto', { includeDirs: [protoDir] });
const greeter = grpc.loadPackageDefinition(definition).greeter.v1;
const client = new greeter.GreeterService(target, grpc.credentials.createInsecure());

console.log('calling');
function call() {
  client.SayHello({ name: 'js' }, { deadline: Date.now() + timeoutMs }, (err, answer) => {
    if (err) {
      const details = String(err.details || '').replace(/\n/g, ' ');
      console.log(`err ${grpc.status[err.code]} ${details}`);
    } else {
      console.log(`ok ${answer.instanceId}`);
    }
    setTimeout(call, pauseMs);
  });
}
call();
