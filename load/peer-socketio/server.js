'use strict';
// The load peer: a minimal, typical Socket.IO v4 server doing the same DM and group relay as
// Palaver, so palaver-load can drive both with the same workload. Default Socket.IO settings,
// one process (no cluster), no artificial delays. It keeps nothing on disk: a message is relayed
// and acknowledged from memory (Palaver commits it to its store first).
//
// Protocol (Socket.IO v4 over Engine.IO v4):
//   connect with auth {token}: an HS256 JWT whose `sub` is the user;
//   emit `join` {room} with an ack -> {room};
//   emit `send` {room, text, client_ref} with an ack -> {id, seq} (or {error});
//   every socket in the room, the sender's included, gets `message`
//   {room, id, seq, sender, text, created_at}.
// Environment: PORT (default 3000), HOST (default 127.0.0.1), JWT_SECRET (required).

const http = require('http');
const { Server } = require('socket.io');
const jwt = require('jsonwebtoken');

const port = Number(process.env.PORT || 3000);
const host = process.env.HOST || '127.0.0.1';
const secret = process.env.JWT_SECRET;
if (!secret) {
  console.error('JWT_SECRET is required');
  process.exit(2);
}

const httpServer = http.createServer();
const io = new Server(httpServer);

io.use((socket, next) => {
  const token = socket.handshake.auth && socket.handshake.auth.token;
  try {
    const claims = jwt.verify(token, secret, { algorithms: ['HS256'] });
    if (typeof claims.sub !== 'string' || claims.sub === '') {
      throw new Error('no sub');
    }
    socket.data.user = claims.sub;
    next();
  } catch (e) {
    next(new Error('unauthorized'));
  }
});

let nextId = 1;
const seqs = new Map();

function answer(ack, value) {
  if (typeof ack === 'function') {
    ack(value);
  }
}

io.on('connection', (socket) => {
  socket.on('join', (arg, ack) => {
    const room = arg && arg.room;
    if (typeof room !== 'string' || room === '') {
      return answer(ack, { error: 'invalid_field' });
    }
    socket.join(room);
    answer(ack, { room });
  });

  socket.on('send', (arg, ack) => {
    const room = arg && arg.room;
    const text = arg && arg.text;
    if (typeof room !== 'string' || typeof text !== 'string') {
      return answer(ack, { error: 'invalid_field' });
    }
    if (!socket.rooms.has(room)) {
      return answer(ack, { error: 'not_member' });
    }
    const seq = (seqs.get(room) || 0) + 1;
    seqs.set(room, seq);
    const message = {
      room,
      id: nextId++,
      seq,
      sender: socket.data.user,
      text,
      created_at: Date.now(),
    };
    answer(ack, { id: message.id, seq });
    io.to(room).emit('message', message);
  });
});

httpServer.listen(port, host, () => {
  console.log(`peer-socketio listening on ${host}:${port}`);
});

function stop() {
  io.close(() => process.exit(0));
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
