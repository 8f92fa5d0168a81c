@echo off
rem Inicia o reprocessador de falhas em segundo plano (reenvia a cada RETRY_INTERVAL s, padrao 300).
rem Uso: scripts\start_retry.bat [completo\failed_events]
setlocal
set INTERVAL=%RETRY_INTERVAL%
if "%INTERVAL%"=="" set INTERVAL=300
set DIRARG=
if not "%~1"=="" set DIRARG=--dir "%~1"
powershell -NoProfile -ExecutionPolicy Bypass -File "%~dp0bg.ps1" start retry retry_failed.py -- %DIRARG% --send --watch %INTERVAL%
exit /b %ERRORLEVEL%
